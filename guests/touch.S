/*
 * touch.S - dirty-page test guest: writes one u16 into each listed segment.
 *
 * Run: from the library only: the host fills its table first (test/kvm/dirty-log.test.ts).
 *
 * Contract with the host:
 *   - Loaded at guest-physical 0x7c00, entered in real mode at CS:IP 0:0x7c00.
 *   - Host fills a table at guest-physical 0x0500 before running:
 *       0x500: u16 N (entry count)
 *       0x502 + 2*i: u16 segment (paragraph number = GPA >> 4) of entry i
 *   - For entry i (0-based) the guest stores the u16 (0xA500 + i) at
 *     segment:0000, i.e. at GPA segment*16. That is the ONLY memory it writes
 *     (no stack: no call/push/int), so the dirty log shows exactly those
 *     pages (plus none from the guest itself).
 *   - Then one `out %al, $0x81` with AL = 0 ("done" marker), then `cli; hlt`.
 *   - Register values at entry are irrelevant (all are set here).
 */
        .code16
        .text
        .globl  _start
_start:
        xor     %ax, %ax
        mov     %ax, %ds                /* table is addressed from segment 0 */
        mov     0x500, %cx              /* CX = N */
        mov     $0x502, %si             /* SI -> first segment value */
        mov     $0xA500, %ax            /* value for entry 0 */
        jcxz    2f                      /* N == 0: nothing to write */
1:      mov     (%si), %bx
        mov     %bx, %es                /* ES = target segment */
        mov     %ax, %es:0              /* the one write for this entry */
        inc     %ax                     /* 0xA500 + i */
        add     $2, %si
        loop    1b                      /* CX-- (16-bit, matches u16 N) */
2:      xor     %al, %al
        out     %al, $0x81              /* done marker, AL = 0 */
        cli
3:      hlt
        jmp     3b                      /* halt again if ever woken */
