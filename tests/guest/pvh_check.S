/* Tiny PVH guest: checks the PVH entry state keel-vmm hands over
   (Xen docs/misc/pvh.pandoc), prints "pvh ok\n" on COM1 byte by byte, then
   does what the command line asks. Entered in 32-bit protected mode at
   pvh_start with ebx = hvm_start_info; linked by pvh_guest.ld with the entry
   note from pvh_note.S.

   The command line must start with "pvh-test"; the letter after "pvh-test "
   picks the ending (anything else, or none: exit 0):
     s  spin forever (for SIGTERM)       f  fault with no usable IDT
     r  reset through the i8042 (0xfe)   p  ACPI S5 power off (port 0x3c0)
     i  first check that module 0 (the initrd) starts with "keel", then exit 0
     w  wait for a byte on COM1 (polling LSR), echo it, then exit 0
     m  read the PCI host bridge's ID through ECAM (MMIO) and through
        ports 0xcf8/0xcfc, then exit 0
     k  report a panic through pvpanic (write 1 to port 0x505), then halt
     h  halt for ever with interrupts off (an idle VM: the vCPU sleeps in
        KVM, for benchmarks of keel-vmm itself)
     c  count forever: print a..z, a..z, ... one letter per step, the
        position kept in RAM (so a restored snapshot goes on from the
        letter after the last one printed)
     j  eject what the host asks, for ever, as the guest's acpiphp would
        without ACPI: read the PCI hotplug registers at 0xfeb01000 (PCIU,
        which the read clears: plugs taken; PCID: slots to eject) and write
        PCID's bits to B0EJ
   A failed check writes its own code to the debug-exit port 0xf4:
     11 magic  12 version  13 command line  14 memmap  15 CR0.PG set
     16 CR0.PE clear  17 initrd module  18 ECAM ID  19 port 0xcf8 ID
   (codes above 10, so they never look like keel-vmm's own statuses 0-3).
   Ring 0 is emulated slowly under PVM: every path is a few dozen instructions. */
	.code32
	.text
	.globl pvh_start
pvh_start:
	mov $11, %al
	cmpl $0x336ec578, (%ebx)        /* hvm_start_info.magic */
	jne fail
	mov $12, %al
	cmpl $1, 4(%ebx)                /* version */
	jb fail
	mov $13, %al
	mov 24(%ebx), %esi              /* cmdline_paddr */
	cmpl $0x2d687670, (%esi)        /* "pvh-" */
	jne fail
	cmpl $0x74736574, 4(%esi)       /* "test" */
	jne fail
	mov $14, %al
	cmpl $0, 48(%ebx)               /* memmap_entries */
	je fail
	mov %cr0, %ecx
	mov $15, %al
	test $0x80000000, %ecx          /* paging must be off */
	jnz fail
	mov $16, %al
	test $1, %ecx                   /* protected mode must be on */
	jz fail

	xor %edi, %edi                  /* the action letter, 0 if none */
	cmpb $' ', 8(%esi)
	jne 1f
	movzbl 9(%esi), %edi
1:
	cmp $'i', %edi
	jne print
	mov $17, %al
	cmpl $1, 12(%ebx)               /* nr_modules */
	jne fail
	mov 16(%ebx), %ecx              /* modlist_paddr */
	mov (%ecx), %ecx                /* modlist[0].paddr */
	cmpl $0x6c65656b, (%ecx)        /* "keel" */
	jne fail

print:
	mov $message, %esi
	mov $0x3f8, %dx
2:	lodsb
	test %al, %al
	jz 3f
	out %al, %dx
	jmp 2b
3:
	cmp $'s', %edi
	je spin
	cmp $'f', %edi
	je fault
	cmp $'r', %edi
	je reset
	cmp $'p', %edi
	je power_off
	cmp $'w', %edi
	je echo
	cmp $'m', %edi
	je pci_ids
	cmp $'k', %edi
	je panic
	cmp $'c', %edi
	je count
	cmp $'h', %edi
	je halt
	cmp $'j', %edi
	je eject
	xor %eax, %eax                  /* every check passed */
fail:
	out %al, $0xf4
halt:
	hlt
	jmp halt

spin:
	jmp spin

fault:
	lidt empty_idt                  /* limit 0: every vector faults */
	ud2
	jmp halt

reset:
	mov $0xfe, %al
	out %al, $0x64
	jmp halt

echo:
	mov $0x3fd, %dx                 /* LSR */
4:	inb %dx, %al
	test $1, %al                    /* data ready */
	jz 4b
	mov $0x3f8, %dx
	inb %dx, %al
	outb %al, %dx
	xor %eax, %eax
	out %al, $0xf4
	jmp halt

pci_ids:
	/* The host bridge's vendor/device ID, once through ECAM (an MMIO exit
	   dispatched on the MMIO bus) and once through configuration mechanism
	   #1 (port exits): both must read 1b36:0008. */
	mov $18, %al
	cmpl $0x00081b36, 0xe0000000    /* ECAM bus 0, device 0, function 0, offset 0 */
	jne fail
	mov $19, %al
	mov %eax, %ecx
	mov $0x80000000, %eax           /* enable, bus 0, device 0, register 0 */
	mov $0xcf8, %dx
	out %eax, %dx
	mov $0xcfc, %dx
	in %dx, %eax
	cmp $0x00081b36, %eax
	mov %ecx, %eax
	jne fail
	xor %eax, %eax
	out %al, $0xf4
	jmp halt

count:
	movzbl counter, %eax
	add $'a', %al
	mov $0x3f8, %dx
	out %al, %dx
	movzbl counter, %eax
	inc %eax
	cmp $26, %eax
	jb 5f
	xor %eax, %eax
5:	movb %al, counter
	mov $20000, %ecx                /* a pause between letters */
6:	dec %ecx
	jnz 6b
	jmp count

eject:
	mov 0xfeb01000, %eax            /* PCIU: the plug notifications, cleared */
	mov 0xfeb01004, %eax            /* PCID: the slots the host asks to eject */
	test %eax, %eax
	jz eject
	mov %eax, 0xfeb01008            /* B0EJ */
	jmp eject

power_off:
	mov $((5 << 2) | (1 << 5)), %al /* SLP_TYP = S5, SLP_EN */
	mov $0x3c0, %dx
	out %al, %dx
	jmp halt

panic:
	mov $1, %al                     /* pvpanic PANICKED */
	mov $0x505, %dx
	out %al, %dx
	jmp halt

	.section .rodata
message:
	.asciz "pvh ok\n"
	.balign 8
empty_idt:
	.word 0
	.long 0

	.section .note.GNU-stack, "", @progbits

	.bss
counter:
	.byte 0
