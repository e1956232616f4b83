/* Tiny guest: the ring-3 template. Ring 0 loads a GDT and a 64-bit TSS
   whose I/O-permission bitmap opens every port below 0x400 (IOPL=3 set by
   iretq is not honoured everywhere, the bitmap is), then iretq's to ring 3.
   Ring 3 fills 4 MiB at 0x400000 with a pattern, sums it back, prints
   "ring3 ok" on COM1 and exits with code 7. rbx holds the sum, and the
   final CS selector shows the exit happened in ring 3. */
	.code64
	.equ LOAD, 0x10000
	.equ TSS_OFFSET, 0x800
	.equ TSS_BASE, LOAD + TSS_OFFSET
	.equ TSS_LIMIT, 104 + 128          /* header + bitmap for ports 0..0x3ff */
	.equ USER_STACK, 0x9000
	.equ BUFFER, 0x400000
	.equ QWORDS, (4 << 20) / 8

	.text
	.globl _start
_start:
	lgdt gdt_pointer(%rip)
	mov $0x28, %ax
	ltr %ax
	pushq $0x23                 /* ss: user data, RPL 3 */
	pushq $USER_STACK
	pushq $0x2                  /* rflags: interrupts off */
	pushq $0x1b                 /* cs: user code, RPL 3 */
	lea user(%rip), %rax
	pushq %rax
	iretq

user:
	mov $BUFFER, %rdi
	xor %rcx, %rcx
fill:
	lea 1(%rcx,%rcx,2), %rax    /* value = 3*i + 1 */
	mov %rax, (%rdi,%rcx,8)
	inc %rcx
	cmp $QWORDS, %rcx
	jne fill

	xor %rax, %rax
	xor %rcx, %rcx
sum:
	add (%rdi,%rcx,8), %rax
	inc %rcx
	cmp $QWORDS, %rcx
	jne sum
	mov %rax, %rbx

	lea message(%rip), %rsi
	mov $(message_end - message), %ecx
	mov $0x3f8, %dx
	rep outsb

	mov $7, %al
	out %al, $0xf4
	jmp .

message:
	.ascii "ring3 ok\n"
message_end:

	.balign 16
gdt:
	.quad 0
	.quad 0x00af9a000000ffff    /* 0x08 kernel code 64 */
	.quad 0x00cf92000000ffff    /* 0x10 kernel data */
	.quad 0x00affa000000ffff    /* 0x18 user code 64, DPL 3 */
	.quad 0x00cff2000000ffff    /* 0x20 user data, DPL 3 */
	/* 0x28: 64-bit available TSS, built from the constants above */
	.word TSS_LIMIT & 0xffff
	.word TSS_BASE & 0xffff
	.byte (TSS_BASE >> 16) & 0xff
	.byte 0x89                  /* present, type 9 */
	.byte (TSS_LIMIT >> 16) & 0x0f
	.byte (TSS_BASE >> 24) & 0xff
	.long 0                     /* base 63:32 */
	.long 0
gdt_end:
gdt_pointer:
	.word gdt_end - gdt - 1
	.quad gdt

	.org TSS_OFFSET
tss:
	.long 0
	.quad 0x8000                /* rsp0 */
	.fill 88, 1, 0
	.word 0                     /* reserved */
	.word 104                   /* I/O map base */
	.fill 128, 1, 0             /* all ports 0..0x3ff allowed */
	.byte 0xff                  /* bitmap terminator */
