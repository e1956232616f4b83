/* Tiny bzImage guest: a whole bzImage in one flat file, setup header and
   all, whose "kernel" checks the 64-bit boot protocol entry state keel-vmm
   hands over (Documentation/arch/x86/boot.rst, "64-bit BOOT PROTOCOL"):
   long mode with paging, __BOOT_CS = 0x10, __BOOT_DS = 0x18, rsi = the zero
   page with the loader's fields filled in. Prints "bzimage ok\n" on COM1
   and writes 0 to the debug-exit port, or the code of the failed check:
     21 rsi  22 "HdrS"  23 type_of_loader  24 command line  25 e820
     26 CR0.PG  27 CS  28 DS  29 initrd
   The command line must start with "bzimage-"; "bzimage-test i" also
   checks that the initrd starts with "keel". */
	.text
	.globl _start
_start:
	/* ---- The setup sectors: only the header fields a 64-bit loader reads. */
	.org 0x1f1
	.byte 4                         /* setup_sects: the payload starts at 5 * 512 */
	.org 0x1fe
	.word 0xaa55                    /* boot_flag */
	.byte 0xeb, 0x66                /* jump: the header ends at 0x202 + 0x66 */
	.ascii "HdrS"
	.word 0x020f                    /* protocol 2.15 */
	.org 0x211
	.byte 0x01                      /* loadflags: LOADED_HIGH */
	.org 0x22c
	.long 0x7fffffff                /* initrd_addr_max */
	.org 0x236
	.word 0x0001                    /* xloadflags: XLF_KERNEL_64 */
	.long 255                       /* cmdline_size */
	.org 0x260
	.long 0x10000                   /* init_size */
	.org 0xa00

	/* ---- The protected-mode payload, loaded at 1 MiB; 64-bit entry at +0x200. */
payload:
	.org 0xa00 + 0x200
	.code64
startup_64:
	mov $21, %al
	cmp $0x7000, %rsi
	jne fail
	mov $22, %al
	cmpl $0x53726448, 0x202(%rsi)   /* "HdrS", copied into the zero page */
	jne fail
	mov $23, %al
	cmpb $0xff, 0x210(%rsi)         /* type_of_loader: undefined */
	jne fail
	mov $24, %al
	mov 0x228(%rsi), %edi           /* cmd_line_ptr */
	movabs $0x2d6567616d697a62, %rcx /* "bzimage-" */
	cmp %rcx, (%rdi)
	jne fail
	mov $25, %al
	cmpb $0, 0x1e8(%rsi)            /* e820_entries */
	je fail
	cmpl $1, 0x2d0 + 16(%rsi)       /* e820_table[0].type: RAM */
	jne fail
	mov $26, %al
	mov %cr0, %rcx
	bt $31, %rcx                    /* paging on */
	jnc fail
	mov $27, %al
	mov %cs, %cx
	cmp $0x10, %cx
	jne fail
	mov $28, %al
	mov %ds, %cx
	cmp $0x18, %cx
	jne fail
	cmpb $'i', 13(%rdi)             /* "bzimage-test i" */
	jne print
	mov $29, %al
	mov 0x218(%rsi), %ecx           /* ramdisk_image */
	test %ecx, %ecx
	jz fail
	cmpl $0x6c65656b, (%rcx)        /* "keel" */
	jne fail

print:
	lea message(%rip), %rsi
	mov $0x3f8, %dx
1:	lodsb
	test %al, %al
	jz 2f
	out %al, %dx
	jmp 1b
2:	xor %eax, %eax
fail:
	out %al, $0xf4
3:	hlt
	jmp 3b

message:
	.asciz "bzimage ok\n"
	.org 0x1400                     /* keel-vmm wants at least a 4 KiB image */

	.section .note.GNU-stack, "", @progbits
