/* Tiny guest: the smallest possible test, writes 42 to the test-exit port.
   Entered in 64-bit mode at 0x10000 by tiny_guest.cc. */
	.code64
	.text
	.globl _start
_start:
	mov $42, %al
	out %al, $0xf4
	hlt
