/* The PVH entry note every PVH guest carries (Xen docs/misc/pvh.pandoc):
   name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY (18), desc the 32-bit physical
   entry address. Linux emits the same note from arch/x86/platform/pvh/head.S. */
	.section .note.Xen, "a", @note
	.balign 4
	.long 4                       /* namesz: "Xen\0" */
	.long 4                       /* descsz */
	.long 18                      /* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.balign 4
	.long pvh_start
	.balign 4
	.section .note.GNU-stack, "", @progbits
