/*
 * A 512-byte x86 boot sector that keeps dirtying guest RAM, for the live-migration test
 * (the same job as the boot block of QEMU's tests/qtest/migration-test, written for this
 * project).
 *
 * SeaBIOS loads it at 0x7c00 and jumps to it in 16-bit real mode. It switches to 32-bit
 * protected mode with flat 4 GiB code/data segments, opens the A20 gate, writes 'A' to the
 * first serial port (COM1, 0x3f8) once, then loops forever: each pass adds 1 to one byte in
 * every 4 KiB page from 1 MiB up to 100 MiB, and every 64 passes it writes 'B'.
 *
 * So after a migration every page in [1 MiB, 100 MiB) holds a pass counter (mod 256) in its
 * first byte; the pages are changing all the time, which keeps the migration from
 * converging until the test raises max-bandwidth.
 *
 * Build: as --32 -o boot.o boot.S && ld -m elf_i386 -Ttext 0x7c00 --oformat binary -o boot.bin boot.o
 * The same 512 bytes, hand-encoded with a comment per instruction, are BOOT_SECTOR in
 * tests/qemu_support.py (used where binutils is missing; a test keeps the two identical).
 */
        .code16
        .section .text
        .globl _start
_start:
        cli                             /* no interrupts: there is no IDT for protected mode */
        xorw    %ax, %ax
        movw    %ax, %ds                /* lgdt reads gdt_desc through %ds */
        lgdtl   gdt_desc
        movl    %cr0, %eax
        orl     $1, %eax                /* CR0.PE: protected mode on */
        movl    %eax, %cr0
        ljmpl   $0x08, $pm32            /* far jump loads the 32-bit code segment */

        .code32
pm32:
        movw    $0x10, %ax              /* flat data segment for ds/es/ss */
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movl    $0x7c00, %esp

        inb     $0x92, %al              /* "fast A20": system control port A, bit 1 */
        orb     $0x02, %al
        outb    %al, $0x92

        movw    $0x3f8, %dx             /* COM1 data register */
        movb    $'A', %al
        outb    %al, %dx

        xorl    %ecx, %ecx              /* pass counter */
pass:
        movl    $0x100000, %eax         /* 1 MiB */
page:
        incb    (%eax)                  /* dirty this page */
        addl    $0x1000, %eax           /* next 4 KiB page */
        cmpl    $(100 << 20), %eax      /* up to 100 MiB */
        jb      page

        incl    %ecx
        testl   $63, %ecx               /* every 64 passes ... */
        jnz     pass
        movb    $'B', %al               /* ... say we are still alive */
        outb    %al, %dx
        jmp     pass

        .p2align 3, 0                   /* pad with zeros (not NOP-like fill) */
gdt:
        .quad   0x0000000000000000      /* null descriptor */
        .quad   0x00cf9a000000ffff      /* 0x08: code, base 0, limit 4 GiB, 32-bit, exec/read */
        .quad   0x00cf92000000ffff      /* 0x10: data, base 0, limit 4 GiB, 32-bit, read/write */
gdt_desc:
        .word   gdt_desc - gdt - 1      /* limit */
        .long   gdt                     /* linear base */

        .org    510
        .byte   0x55, 0xaa              /* boot signature */
