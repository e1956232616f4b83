/* Tiny guest for snapshot tests, built on ring3_memory.S's ring-0 part.
   Ring 0 also enables SSE (CR4.OSFXSR) so ring 3 keeps state in XMM
   registers, which only a correct XSAVE restore carries across. Ring 3
   runs PASSES passes; pass p fills its own 512 KiB at BUFFER + p * 512 KiB
   with value(i) = 3*i + p * 0x100000001 + 1, sums them back, folds the sum
   into r13 (r13 = r13 * 31 + sum) and adds it to xmm0, then writes p to the
   checkpoint port 0xf5 (where a test may snapshot the guest). At the end
   rbx = xmm0's low quadword, r12 = PASSES, r13 the folded sum; it prints
   "snapshot ok" and exits with code 9. */
	.code64
#include "ring3.inc"
	.equ BUFFER, 0x400000
	.equ PASS_BYTES, 512 << 10
	.equ PASS_QWORDS, PASS_BYTES / 8
	.equ PASSES, 8
	.equ CHECKPOINT_PORT, 0xf5

	.text
	.globl _start
_start:
	mov %cr4, %rax
	or $0x600, %rax             /* OSFXSR | OSXMMEXCPT */
	mov %rax, %cr4
	ENTER_RING3 user

user:
	xor %r12, %r12              /* pass */
	xor %r13, %r13              /* folded sum */
	pxor %xmm0, %xmm0
pass:
	mov %r12, %rdi
	imul $PASS_BYTES, %rdi
	add $BUFFER, %rdi
	mov $0x100000001, %rdx
	imul %r12, %rdx
	inc %rdx                    /* rdx = p * 0x100000001 + 1 */
	xor %rcx, %rcx
fill:
	lea (%rcx,%rcx,2), %rax
	add %rdx, %rax
	mov %rax, (%rdi,%rcx,8)
	inc %rcx
	cmp $PASS_QWORDS, %rcx
	jne fill

	xor %rax, %rax
	xor %rcx, %rcx
sum:
	add (%rdi,%rcx,8), %rax
	inc %rcx
	cmp $PASS_QWORDS, %rcx
	jne sum
	imul $31, %r13
	add %rax, %r13
	movq %rax, %xmm1
	paddq %xmm1, %xmm0

	mov %r12d, %eax
	out %al, $CHECKPOINT_PORT
	inc %r12
	cmp $PASSES, %r12
	jne pass

	movq %xmm0, %rbx
	PRINT_AND_EXIT 9

message:
	.ascii "snapshot ok\n"
message_end:

	RING3_TABLES
