/* Tiny PVH guest for the live migration tests: it checks, after every pass,
   that its memory holds exactly what it wrote, with pages turning zero and
   back all the time, so a migration that loses a page, sends a stale copy
   or fails to zero a page that became zero is caught by the guest itself.

   Ring 0 (32-bit PVH entry) identity-maps the first 1 GiB with 2 MiB user
   pages, enters long mode and iretq's to ring 3 (ring3.inc; PVM runs ring 3
   natively). Ring 3 loops over generations g = 1, 2, ...: page by page, it
   checks that each of the PAGES pages at WORK_BASE holds generation g-1's
   value (all zeros for g-1 = 0: fresh RAM) and writes generation g into
   it, then prints one letter on COM1 (a for g = 1, b, ... z, a, ...). Page p of generation g
   is all zeros when (p + g) % 3 == 0, else every qword is
   (g << 16) + p + 1, so each generation a third of the pages that held
   data become zero and a third of the zero pages get data.
   A mismatch prints "\nBAD\n" and writes 13 to the debug-exit port 0xf4.

   Built three times: zero_pages_check.elf as it is,
   zero_pages_check_large.elf with -DPAGES=8192 (32 MiB, more pages a pass
   than a vCPU's dirty ring holds), and dirty_rate_check.elf with
   -DPAGES=256 -DWRITE_DELAY=N, which spins N iterations after writing each
   page, so it dirties pages at a bounded rate per unit of time it runs (the
   auto-converge test: throttling its vCPU makes it dirty fewer pages per
   migration round, where the fast one rewrites all of them in every round
   however little it runs). */
	.equ LOAD, 0x100000                 /* pvh_guest.ld links .text here */
#include "ring3.inc"
	.equ WORK_BASE, 0x1000000           /* 16 MiB */
#ifndef PAGES
#define PAGES 1024                          /* 4 MiB */
#endif
#ifndef WRITE_DELAY
#define WRITE_DELAY 0
#endif
	.equ COM1, 0x3f8

	.text
	/* The GDT and TSS first: RING3_TABLES puts the TSS at LOAD + TSS_OFFSET. */
	RING3_TABLES

	.code32
	.globl pvh_start
pvh_start:
	PVH_LONG_MODE
	ENTER_RING3 user

/* rax: the value of page r8 in generation r13. Clobbers rdx, rcx. */
page_value:
	lea (%r8,%r13), %rax
	xor %edx, %edx
	mov $3, %ecx
	div %rcx
	xor %eax, %eax
	test %rdx, %rdx
	jz 1f
	test %r13, %r13
	jz 1f
	mov %r13, %rax
	shl $16, %rax
	lea 1(%rax,%r8), %rax
1:	ret

user:
	mov $1, %r12                        /* r12: generation g */
	xor %r14d, %r14d                    /* r14: letter index, g - 1 mod 26 */
generation:
	/* Page by page: check that it holds generation g - 1, then write
	   generation g. Each page is checked right before it is overwritten,
	   so a stale page is caught wherever the guest stopped (a sweep that
	   checked every page and then wrote every page would overwrite, unseen,
	   the pages after the one it was writing when it was migrated). */
	xor %r8d, %r8d                      /* r8: page */
each_page:
	lea -1(%r12), %r13
	call page_value
	mov %r8, %rdi
	shl $12, %rdi
	add $WORK_BASE, %rdi
	mov $512, %ecx
	cld
	repe scasq
	jne bad
	mov %r12, %r13
	call page_value
	mov %r8, %rdi
	shl $12, %rdi
	add $WORK_BASE, %rdi
	mov $512, %ecx
	rep stosq
#if WRITE_DELAY
	mov $WRITE_DELAY, %ecx
2:	dec %ecx
	jnz 2b
#endif
	inc %r8
	cmp $PAGES, %r8
	jne each_page

	lea 'a'(%r14), %eax
	mov $COM1, %dx
	out %al, %dx
	inc %r14
	cmp $26, %r14
	jne 1f
	xor %r14d, %r14d
1:	inc %r12
	jmp generation

bad:
	lea text_bad(%rip), %rsi
	mov $(text_bad_end - text_bad), %ecx
	mov $COM1, %dx
	rep outsb
	mov $13, %al
	out %al, $0xf4
	jmp .

	.section .rodata
text_bad:
	.ascii "\nBAD\n"
text_bad_end:

	PVH_IDENTITY_MAP

	.section .note.GNU-stack, "", @progbits

	.bss
	.balign 16
	.skip 256
ring0_stack_top:
