/* Tiny PVH guest for bench/migrate.py: the guest-observed downtime of a live
   migration. Boots under keel-vmm (--kernel) and QEMU (-kernel) alike.

   The command line is "migbench WS PERIOD": WS the working set in MiB
   (1-512), PERIOD the report period in millions of TSC cycles (1-100000).
   Ring 0 (32-bit PVH entry, paging off) parses it, identity-maps the first
   1 GiB with 2 MiB user pages, enters long mode and iretq's to ring 3
   (ring3.inc; PVM runs ring 3 natively, ring 0 slowly). Ring 3 loops for
   ever: write one qword into the next 4 KiB page of the working set at
   256 MiB (so every page is dirtied once per pass), read the TSC, keep the
   largest gap between two consecutive iterations. Once per period it
   prints on COM1
       maxgap CYCLES at TSC_END loops N tsc T
   (the period's largest gap and the TSC at its end, the iterations in the
   period, the TSC now), then
   starts a new period with the TSC read after printing, so the port exits
   of the report itself never count as a gap.
   A bad command line writes its code to the debug-exit port 0xf4:
     21 working set  22 period */
	.equ LOAD, 0x100000                 /* pvh_guest.ld links .text here */
#include "ring3.inc"
	.equ WORK_BASE, 0x10000000
	.equ WORK_MAX_MIB, 512
	.equ PERIOD_MAX, 100000
	.equ COM1, 0x3f8

	.text
	/* The GDT and TSS first: RING3_TABLES puts the TSS at LOAD + TSS_OFFSET. */
	RING3_TABLES

	/* Parses the next decimal number at esi into \out (0 if none). */
	.macro PARSE_DECIMAL out
	xor \out, \out
1:	movzbl (%esi), %eax
	test %eax, %eax
	jz 3f
	sub $'0', %eax
	cmp $9, %eax
	jbe 2f
	inc %esi
	jmp 1b
2:	imul $10, \out, \out
	add %eax, \out
	inc %esi
	movzbl (%esi), %eax
	sub $'0', %eax
	cmp $9, %eax
	jbe 2b
3:
	.endm

	/* Writes the bytes from label \from to label \to on COM1. */
	.macro PRINT_TEXT from, to
	lea \from(%rip), %rdi
	mov $(\to - \from), %ecx
	call print_bytes
	.endm

	.code32
	.globl pvh_start
pvh_start:
	mov 24(%ebx), %esi                  /* hvm_start_info.cmdline_paddr */
	PARSE_DECIMAL %edi                  /* working set, MiB */
	PARSE_DECIMAL %ebp                  /* period, millions of cycles */
	mov $21, %al
	test %edi, %edi
	jz fail
	cmp $WORK_MAX_MIB, %edi
	ja fail
	mov $22, %al
	test %ebp, %ebp
	jz fail
	cmp $PERIOD_MAX, %ebp
	ja fail

	PVH_LONG_MODE
	mov %edi, %edi                      /* zero-extend both numbers */
	mov %ebp, %ebp
	ENTER_RING3 user

	.code32
fail:
	out %al, $0xf4
1:	hlt
	jmp 1b

	.code64

user:
	mov %rdi, %r14
	shl $20, %r14                       /* r14: working-set bytes */
	imul $1000000, %rbp, %r15           /* r15: period in cycles */
	mov $WORK_BASE, %rsi
	xor %r12, %r12                      /* r12: offset in the working set */
	xor %r13, %r13                      /* r13: iterations so far */
	xor %ebp, %ebp                      /* rbp: r13 at the last report */
	xor %r10, %r10                      /* r10: largest gap this period */
	rdtsc
	shl $32, %rdx
	or %rdx, %rax
	mov %rax, %r9                       /* r9: TSC of the last iteration */
	mov %rax, %rcx                      /* rcx: TSC at the end of the largest gap */
	lea (%rax,%r15), %r11               /* r11: TSC of the next report */
loop:
	mov %r13, (%rsi,%r12)
	inc %r13
	add $4096, %r12
	cmp %r14, %r12
	jb 1f
	xor %r12, %r12
1:	rdtsc
	shl $32, %rdx
	or %rdx, %rax
	mov %rax, %rbx
	sub %r9, %rbx
	cmp %r10, %rbx
	cmova %rbx, %r10
	cmova %rax, %rcx                    /* rcx: TSC at the end of it */
	mov %rax, %r9
	cmp %r11, %rax
	jb loop

	mov %rax, %rbx                      /* the TSC at the report */
	push %rcx
	PRINT_TEXT text_maxgap, text_at
	mov %r10, %rax
	call print_decimal
	PRINT_TEXT text_at, text_loops
	pop %rax
	call print_decimal
	PRINT_TEXT text_loops, text_tsc
	mov %r13, %rax
	sub %rbp, %rax
	mov %r13, %rbp
	call print_decimal
	PRINT_TEXT text_tsc, text_newline
	mov %rbx, %rax
	call print_decimal
	PRINT_TEXT text_newline, text_end

	xor %r10, %r10
	rdtsc
	shl $32, %rdx
	or %rdx, %rax
	mov %rax, %r9
	mov %rax, %rcx
	lea (%rax,%r15), %r11
	jmp loop

/* Writes rax in decimal on COM1. Clobbers rax, rcx, rdx, rdi, r8. */
print_decimal:
	lea digits_end(%rip), %rdi
	mov $10, %r8
1:	xor %edx, %edx
	div %r8
	add $'0', %dl
	dec %rdi
	mov %dl, (%rdi)
	test %rax, %rax
	jnz 1b
	lea digits_end(%rip), %rcx
	sub %rdi, %rcx
	/* fall through */
/* Writes ecx bytes from rdi on COM1. Clobbers rax, rcx, rdx, rdi. */
print_bytes:
	mov $COM1, %dx
1:	mov (%rdi), %al
	out %al, %dx
	inc %rdi
	dec %ecx
	jnz 1b
	ret

	.section .rodata
text_maxgap:
	.ascii "maxgap "
text_at:
	.ascii " at "
text_loops:
	.ascii " loops "
text_tsc:
	.ascii " tsc "
text_newline:
	.ascii "\n"
text_end:

	PVH_IDENTITY_MAP

	.section .note.GNU-stack, "", @progbits

	.bss
	.balign 4096                        /* away from the code: no self-modifying-code stalls */
digits:
	.skip 24
digits_end:
	.balign 16
	.skip 256
ring0_stack_top:
