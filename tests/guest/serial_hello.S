/* Tiny guest: prints a line on COM1 (port 0x3f8) with rep outsb, then
   writes 0 to the test-exit port. Checks string port I/O exits. */
	.code64
	.text
	.globl _start
_start:
	lea message(%rip), %rsi
	mov $(message_end - message), %ecx
	mov $0x3f8, %dx
	rep outsb
	mov $0, %al
	out %al, $0xf4
	hlt
message:
	.ascii "hello from a tiny guest\n"
message_end:
