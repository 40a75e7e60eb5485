/* Ferry's PVH test guest for Cloud Hypervisor (testbeds/ch-guest).
 *
 * CH enters a PVH kernel in 32-bit protected mode at CPL0, paging off, interrupts off,
 * at the address in the XEN_ELFNOTE_PHYS32_ENTRY note below.
 *
 * The guest keeps a table of WORK_PAGES pages at WORK. Pass p (p = 1, 2, ...) visits
 * every page i and, before writing it, checks that it still holds what pass p-1 wrote:
 * the first dword is the pass number p-1 and the last dword is (p-1) xor i xor SALT
 * (pass 0 means "never written": both zero). A page a migration lost, left stale or
 * copied from the wrong place fails the check: the guest prints
 *     BAD page=<i> pass=<p> first=<x> last=<y>
 * on COM1, counts it, repairs the page and goes on. Every PRINT_EVERY passes it prints
 *     pass=<p> bad=<n>
 * so a test reads a counter that must keep growing at the destination and a bad count
 * that must stay 0. The current pass number is also kept at PASS_AT for a memory dump.
 */
        .set WORK,        0x00400000   /* 4 MiB: above the stack and the code */
        .set WORK_PAGES,  8192         /* 32 MiB working set */
        .set PAGE,        4096
        .set SALT,        0x5a17c0de
        .set PASS_AT,     0x00300000
        .set BAD_AT,      0x00300004
        .set PRINT_EVERY, 8
        .set COM1,        0x3f8

        .code32
        .section .text, "ax"
        .globl entry
entry:
        movl    $0x00200000, %esp
        movl    $0, BAD_AT
        movl    $hello, %esi
        call    print
        movl    $1, %ebx                /* ebx = pass */
next_pass:
        xorl    %ecx, %ecx              /* ecx = page index */
        movl    $WORK, %edi             /* edi = page address */
next_page:
        /* expected: first = pass-1, last = (pass-1) ^ i ^ SALT, or both 0 before pass 1 */
        leal    -1(%ebx), %eax
        cmpl    %eax, (%edi)
        jne     broken
        testl   %eax, %eax
        jz      1f                      /* never written: last dword must be 0 too */
        xorl    %ecx, %eax
        xorl    $SALT, %eax
1:      cmpl    %eax, PAGE-4(%edi)
        jne     broken
stamp:
        movl    %ebx, (%edi)
        movl    %ebx, %eax
        xorl    %ecx, %eax
        xorl    $SALT, %eax
        movl    %eax, PAGE-4(%edi)
        addl    $PAGE, %edi
        incl    %ecx
        cmpl    $WORK_PAGES, %ecx
        jb      next_page
        movl    %ebx, PASS_AT
        testl   $(PRINT_EVERY-1), %ebx
        jnz     2f
        movl    $passmsg, %esi
        call    print
        movl    %ebx, %eax
        call    hex
        movl    $badmsg, %esi
        call    print
        movl    BAD_AT, %eax
        call    hex
        movb    $'\n', %al
        call    putc
2:      incl    %ebx
        jmp     next_pass

broken: /* report the page, count it, repair it (the stamp below), go on */
        incl    BAD_AT
        movl    $bad1, %esi
        call    print
        movl    %ecx, %eax
        call    hex
        movl    $bad2, %esi
        call    print
        movl    %ebx, %eax
        call    hex
        movl    $bad3, %esi
        call    print
        movl    (%edi), %eax
        call    hex
        movl    $bad4, %esi
        call    print
        movl    PAGE-4(%edi), %eax
        call    hex
        movb    $'\n', %al
        call    putc
        jmp     stamp

/* putc: %al to COM1 (clobbers %edx) */
putc:   movw    $COM1, %dx
        outb    %al, %dx
        ret

/* print: the NUL-terminated string at %esi (clobbers %eax, %edx, %esi) */
print:  lodsb
        testb   %al, %al
        jz      3f
        call    putc
        jmp     print
3:      ret

/* hex: %eax as 8 hex digits (keeps %ebx, %ecx, %edi) */
hex:    pushl   %ecx
        pushl   %ebx
        movl    %eax, %ebx
        movl    $8, %ecx
4:      roll    $4, %ebx
        movl    %ebx, %eax
        andl    $0xf, %eax
        movb    digits(%eax), %al
        call    putc
        decl    %ecx
        jnz     4b
        popl    %ebx
        popl    %ecx
        ret

        .section .rodata, "a"
digits:  .ascii "0123456789abcdef"
hello:   .asciz "ferry-ch-guest: running\n"
passmsg: .asciz "pass="
badmsg:  .asciz " bad="
bad1:    .asciz "BAD page="
bad2:    .asciz " pass="
bad3:    .asciz " first="
bad4:    .asciz " last="

        /* PVH entry point: XEN_ELFNOTE_PHYS32_ENTRY (type 18), name "Xen". */
        .section .note.Xen, "a", @note
        .balign 4
        .long   4
        .long   4
        .long   18
        .asciz  "Xen"
        .balign 4
        .long   entry
