"""Host families: one file each, duck-typed detection, no hard imports of optional hosts."""
