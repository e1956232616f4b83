/* Tiny guest: spins forever in ring 0 without exiting, to prove the runner's
   timeout stops a runaway guest. */
	.code64
	.text
	.globl _start
_start:
	jmp _start
