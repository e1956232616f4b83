/* Tiny guest: the ring-3 template. Ring 0 loads a GDT and a 64-bit TSS
   whose I/O-permission bitmap opens every port below 0x400 (IOPL=3 set by
   iretq is not honoured everywhere, the bitmap is), then iretq's to ring 3
   (ENTER_RING3 and RING3_TABLES from ring3.inc).
   Ring 3 fills 4 MiB at 0x400000 with a pattern, sums it back, prints
   "ring3 ok" on COM1 and exits with code 7. rbx holds the sum, and the
   final CS selector shows the exit happened in ring 3. */
	.code64
#include "ring3.inc"
	.equ BUFFER, 0x400000
	.equ QWORDS, (4 << 20) / 8

	.text
	.globl _start
_start:
	ENTER_RING3 user

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

	PRINT_AND_EXIT 7

message:
	.ascii "ring3 ok\n"
message_end:

	RING3_TABLES
