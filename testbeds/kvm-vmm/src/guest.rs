//! The guest: a hand-assembled 64-bit CPL3 program that dirties memory with a verifiable
//! record, its memory layout, and [`verify`], the check of that record.
//!
//! # The record
//!
//! Guest RAM past the low tables holds, per vCPU, a control block (config in, counters
//! out), a **generation table** (one `u64` per data page: how often it was written) and the
//! **data pages**. Each vCPU owns a disjoint partition of the data pages. For every page it
//! writes, the guest (in this order):
//!
//! 1. picks page `g` (sequential, random or in a hot set) and stores `g` in `cur_page`;
//! 2. reads `gen = table[g] + 1`;
//! 3. writes the page's stamp: word 0 = `g`, word 1 = `gen`, then `fill` words
//!    `((g << 32) ^ gen) + i`;
//! 4. stores `table[g] = gen`;
//! 5. increments `writes`; after `burst` pages it increments `bursts` and exits with
//!    `out 0x10, al` so the VMM can pace it and count progress.
//!
//! So at any instant every page except `cur_page` holds exactly the stamp its table entry
//! names, and the sum of a partition's table equals `writes` (or `writes + 1` between
//! steps 4 and 5). A page that missed its latest copy in a migration, or a counter that
//! went back, breaks one of these equalities. [`verify`] checks all of them.
//!
//! The guest cannot read time cheaply at CPL3 under PVM, so the VMM paces it: after each
//! `out` the vCPU thread sleeps as needed for the configured rate.

use anyhow::{bail, ensure, Context, Result};
use ferry_cpl3_guest::{GuestRam, FREE_GPA};

/// Page size.
pub const PAGE: u64 = 4096;
/// Where the program is loaded (and where vCPUs start).
pub const CODE_GPA: u64 = FREE_GPA;
/// The control blocks, one page per vCPU.
pub const CTRL_GPA: u64 = FREE_GPA + 0x1_0000;
/// Most vCPUs (control block pages between `CTRL_GPA` and the table).
pub const MAX_VCPUS: usize = 64;
/// Start of the generation table (2 MiB).
pub const TABLE_GPA: u64 = 2 << 20;
/// The port the guest reports progress on.
pub const PROGRESS_PORT: u16 = 0x10;
/// Magic in each control block's first word ("FERRYCB1").
pub const CTRL_MAGIC: u64 = u64::from_le_bytes(*b"FERRYCB1");
/// Most fill words per page (the page holds 512 words, two are the stamp).
pub const MAX_FILL_WORDS: u64 = 510;

/// Control-block field offsets (bytes from the block's start). The program reads the
/// configuration fields once, at start, into registers.
pub mod ctrl {
    /// `CTRL_MAGIC`.
    pub const MAGIC: u64 = 0x00;
    /// First data page (index into the data area) of this vCPU's partition.
    pub const PART_BASE: u64 = 0x08;
    /// Pages the pattern picks from (`part_count`, or the hot-set size).
    pub const MODULUS: u64 = 0x10;
    /// Pages per `out`.
    pub const BURST: u64 = 0x18;
    /// 1 = xorshift64 random cursor, 0 = sequential.
    pub const RANDOM: u64 = 0x20;
    /// Pattern state (sequential position or xorshift state).
    pub const CURSOR: u64 = 0x28;
    /// Pages written so far (counter).
    pub const WRITES: u64 = 0x30;
    /// Bursts completed so far (counter).
    pub const BURSTS: u64 = 0x38;
    /// Data page being written now.
    pub const CUR_PAGE: u64 = 0x40;
    /// Pages in this vCPU's partition.
    pub const PART_COUNT: u64 = 0x48;
    /// GPA of the generation table.
    pub const TABLE: u64 = 0x50;
    /// Fill words per page.
    pub const FILL: u64 = 0x58;
    /// GPA of the data area.
    pub const DATA: u64 = 0x60;
    /// vCPU index.
    pub const VCPU: u64 = 0x68;
}

/// The program. rdi = this vCPU's control block. Assembled by hand; each line gives the
/// offset, the bytes and the instruction (checked with GNU as + objdump).
#[rustfmt::skip]
pub const PROGRAM: &[u8] = &[
    // start: load the configuration into registers
    0x4c, 0x8b, 0x47, 0x08,             // 00 mov r8,  [rdi+0x08]   part_base
    0x4c, 0x8b, 0x4f, 0x10,             // 04 mov r9,  [rdi+0x10]   modulus
    0x4c, 0x8b, 0x57, 0x18,             // 08 mov r10, [rdi+0x18]   burst
    0x4c, 0x8b, 0x5f, 0x50,             // 0c mov r11, [rdi+0x50]   table
    0x4c, 0x8b, 0x67, 0x60,             // 10 mov r12, [rdi+0x60]   data
    0x4c, 0x8b, 0x6f, 0x58,             // 14 mov r13, [rdi+0x58]   fill words
    0x4c, 0x8b, 0x77, 0x20,             // 18 mov r14, [rdi+0x20]   random flag
    // outer:
    0x4d, 0x89, 0xd7,                   // 1c mov r15, r10          pages left in burst
    // inner: next cursor
    0x48, 0x8b, 0x47, 0x28,             // 1f mov rax, [rdi+0x28]   cursor
    0x4d, 0x85, 0xf6,                   // 23 test r14, r14
    0x74, 0x20,                         // 26 jz seq (+0x20 -> 48)
    0x48, 0x89, 0xc2,                   // 28 mov rdx, rax          xorshift64:
    0x48, 0xc1, 0xe2, 0x0d,             // 2b shl rdx, 13
    0x48, 0x31, 0xd0,                   // 2f xor rax, rdx
    0x48, 0x89, 0xc2,                   // 32 mov rdx, rax
    0x48, 0xc1, 0xea, 0x07,             // 35 shr rdx, 7
    0x48, 0x31, 0xd0,                   // 39 xor rax, rdx
    0x48, 0x89, 0xc2,                   // 3c mov rdx, rax
    0x48, 0xc1, 0xe2, 0x11,             // 3f shl rdx, 17
    0x48, 0x31, 0xd0,                   // 43 xor rax, rdx
    0xeb, 0x04,                         // 46 jmp picked (+4 -> 4c)
    // seq:
    0x48, 0x83, 0xc0, 0x01,             // 48 add rax, 1
    // picked: g = part_base + cursor % modulus
    0x48, 0x89, 0x47, 0x28,             // 4c mov [rdi+0x28], rax   store cursor
    0x31, 0xd2,                         // 50 xor edx, edx
    0x49, 0xf7, 0xf1,                   // 52 div r9                rdx = rax % modulus
    0x4c, 0x01, 0xc2,                   // 55 add rdx, r8           rdx = g
    0x48, 0x89, 0x57, 0x40,             // 58 mov [rdi+0x40], rdx   cur_page = g
    0x49, 0x8b, 0x1c, 0xd3,             // 5c mov rbx, [r11+rdx*8]  gen = table[g]
    0x48, 0x83, 0xc3, 0x01,             // 60 add rbx, 1            gen + 1
    0x48, 0x89, 0xd6,                   // 64 mov rsi, rdx
    0x48, 0xc1, 0xe6, 0x0c,             // 67 shl rsi, 12
    0x4c, 0x01, 0xe6,                   // 6b add rsi, r12          rsi = page address
    0x48, 0x89, 0x16,                   // 6e mov [rsi], rdx        stamp word 0 = g
    0x48, 0x89, 0x5e, 0x08,             // 71 mov [rsi+8], rbx      stamp word 1 = gen
    0x4c, 0x89, 0xe9,                   // 75 mov rcx, r13          fill count
    0x48, 0x89, 0xd0,                   // 78 mov rax, rdx
    0x48, 0xc1, 0xe0, 0x20,             // 7b shl rax, 32
    0x48, 0x31, 0xd8,                   // 7f xor rax, rbx          v = (g << 32) ^ gen
    0x48, 0x8d, 0x6e, 0x10,             // 82 lea rbp, [rsi+16]
    // fill:
    0x48, 0x85, 0xc9,                   // 86 test rcx, rcx
    0x74, 0x12,                         // 89 jz filled (+0x12 -> 9d)
    0x48, 0x89, 0x45, 0x00,             // 8b mov [rbp], rax        word = v + i
    0x48, 0x83, 0xc5, 0x08,             // 8f add rbp, 8
    0x48, 0x83, 0xc0, 0x01,             // 93 add rax, 1
    0x48, 0x83, 0xe9, 0x01,             // 97 sub rcx, 1
    0xeb, 0xe9,                         // 9b jmp fill (-0x17 -> 86)
    // filled:
    0x49, 0x89, 0x1c, 0xd3,             // 9d mov [r11+rdx*8], rbx  table[g] = gen
    0x48, 0x83, 0x47, 0x30, 0x01,       // a1 add qword [rdi+0x30], 1   writes += 1
    0x49, 0x83, 0xef, 0x01,             // a6 sub r15, 1
    0x0f, 0x85, 0x6f, 0xff, 0xff, 0xff, // aa jnz inner (-0x91 -> 1f)
    0x48, 0x83, 0x47, 0x38, 0x01,       // b0 add qword [rdi+0x38], 1   bursts += 1
    0xe6, 0x10,                         // b5 out 0x10, al          report to the VMM
    0xe9, 0x60, 0xff, 0xff, 0xff,       // b7 jmp outer (-0xa0 -> 1c)
];

/// How the guest picks pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pattern {
    /// Page after page through the partition, wrapping.
    Sequential,
    /// Uniformly random pages of the partition (xorshift64).
    Random,
    /// Random pages among the first `hot_pages` of the partition.
    Hot,
}

impl Pattern {
    /// Tag in the device state.
    pub fn tag(self) -> u8 {
        match self {
            Self::Sequential => 1,
            Self::Random => 2,
            Self::Hot => 3,
        }
    }

    /// From a device-state tag.
    pub fn from_tag(t: u8) -> Option<Self> {
        Some(match t {
            1 => Self::Sequential,
            2 => Self::Random,
            3 => Self::Hot,
            _ => return None,
        })
    }
}

/// The guest's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestConfig {
    /// RAM in bytes (multiple of `regions` x 2 MiB).
    pub ram: u64,
    /// Number of RAM regions (memfds / KVM slots), equal sizes, contiguous from GPA 0.
    pub regions: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// Page pattern.
    pub pattern: Pattern,
    /// Hot-set size in pages (for [`Pattern::Hot`]).
    pub hot_pages: u64,
    /// Pages per `out`.
    pub burst: u64,
    /// Fill words per page written (0..=510).
    pub fill_words: u64,
}

/// Where things are, derived from a [`GuestConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// GPA of the data area.
    pub data_gpa: u64,
    /// Data pages in total.
    pub data_pages: u64,
    /// Data pages per vCPU partition.
    pub part_pages: u64,
}

impl GuestConfig {
    /// Checks the configuration and derives the layout.
    ///
    /// # Errors
    ///
    /// When the numbers do not fit (too little RAM, too many vCPUs, ...).
    pub fn layout(&self) -> Result<Layout> {
        const TWO_MIB: u64 = 2 << 20;
        ensure!(
            self.vcpus >= 1 && self.vcpus as usize <= MAX_VCPUS,
            "1..={MAX_VCPUS} vCPUs"
        );
        ensure!(self.regions >= 1, "at least one region");
        ensure!(
            self.ram.is_multiple_of(u64::from(self.regions) * TWO_MIB),
            "RAM must split into regions of whole 2 MiB"
        );
        ensure!(self.ram <= 64 << 30, "at most 64 GiB (page-table limit)");
        ensure!(self.burst >= 1, "burst must be at least 1");
        ensure!(
            self.fill_words <= MAX_FILL_WORDS,
            "at most {MAX_FILL_WORDS} fill words"
        );
        let pages = self.ram / PAGE;
        let table = (pages * 8).div_ceil(TWO_MIB) * TWO_MIB;
        let data_gpa = TABLE_GPA + table;
        ensure!(
            data_gpa + TWO_MIB <= self.ram,
            "RAM too small for the table and data"
        );
        let data_pages = (self.ram - data_gpa) / PAGE;
        let part_pages = data_pages / u64::from(self.vcpus);
        ensure!(part_pages >= 1, "no data pages per vCPU");
        if self.pattern == Pattern::Hot {
            ensure!(
                (1..=part_pages).contains(&self.hot_pages),
                "hot set must be 1..={part_pages} pages"
            );
        }
        Ok(Layout {
            data_gpa,
            data_pages,
            part_pages,
        })
    }

    /// The regions as `(gpa, size)`.
    pub fn region_layout(&self) -> Vec<(u64, u64)> {
        let size = self.ram / u64::from(self.regions);
        (0..u64::from(self.regions))
            .map(|i| (i * size, size))
            .collect()
    }
}

/// Writes a non-zero word into the last 8 bytes of every data page of fresh RAM (before
/// the guest runs): the record check reads at most the first `2 + fill_words` words of a
/// page and requires only the first two of a never-written page to be zero.
///
/// # Errors
///
/// When the layout is invalid.
pub fn ballast(ram: &GuestRam, cfg: &GuestConfig) -> Result<()> {
    let l = cfg.layout()?;
    for g in 0..l.data_pages {
        ram.write_u64(l.data_gpa + g * PAGE + PAGE - 8, 0xba11_a570_0000_0000 | g)
            .context("data page outside RAM")?;
    }
    Ok(())
}

/// GPA of vCPU `v`'s control block.
pub fn ctrl_gpa(v: u32) -> u64 {
    CTRL_GPA + u64::from(v) * PAGE
}

/// Writes the program and the control blocks into fresh RAM.
///
/// # Errors
///
/// When the layout is invalid or RAM is too small.
pub fn install(ram: &GuestRam, cfg: &GuestConfig) -> Result<()> {
    let l = cfg.layout()?;
    ram.write(CODE_GPA, PROGRAM)
        .context("program outside RAM")?;
    for v in 0..cfg.vcpus {
        let b = ctrl_gpa(v);
        let (modulus, random, cursor) = match cfg.pattern {
            Pattern::Sequential => (l.part_pages, 0, u64::MAX), // +1 wraps to page 0 first
            Pattern::Random => (l.part_pages, 1, seed(v)),
            Pattern::Hot => (cfg.hot_pages, 1, seed(v)),
        };
        let fields = [
            (ctrl::MAGIC, CTRL_MAGIC),
            (ctrl::PART_BASE, u64::from(v) * l.part_pages),
            (ctrl::MODULUS, modulus),
            (ctrl::BURST, cfg.burst),
            (ctrl::RANDOM, random),
            (ctrl::CURSOR, cursor),
            (ctrl::WRITES, 0),
            (ctrl::BURSTS, 0),
            (ctrl::CUR_PAGE, u64::from(v) * l.part_pages),
            (ctrl::PART_COUNT, l.part_pages),
            (ctrl::TABLE, TABLE_GPA),
            (ctrl::FILL, cfg.fill_words),
            (ctrl::DATA, l.data_gpa),
            (ctrl::VCPU, u64::from(v)),
        ];
        for (off, val) in fields {
            ram.write_u64(b + off, val)
                .context("control block outside RAM")?;
        }
    }
    Ok(())
}

fn seed(v: u32) -> u64 {
    (u64::from(v) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// One vCPU's counters, read from its control block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// Pages written.
    pub writes: u64,
    /// Bursts completed.
    pub bursts: u64,
    /// Pattern cursor.
    pub cursor: u64,
    /// Page in progress.
    pub cur_page: u64,
}

/// Reads every vCPU's counters (volatile loads; consistent only while paused).
///
/// # Errors
///
/// When a control block is outside RAM.
pub fn counters(ram: &GuestRam, vcpus: u32) -> Result<Vec<Counters>> {
    (0..vcpus)
        .map(|v| {
            let b = ctrl_gpa(v);
            let r = |off| ram.read_u64(b + off).context("control block outside RAM");
            Ok(Counters {
                writes: r(ctrl::WRITES)?,
                bursts: r(ctrl::BURSTS)?,
                cursor: r(ctrl::CURSOR)?,
                cur_page: r(ctrl::CUR_PAGE)?,
            })
        })
        .collect()
}

/// What [`verify`] checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Data pages checked.
    pub pages: u64,
    /// Pages ever written (generation > 0).
    pub written_pages: u64,
    /// Per vCPU counters.
    pub counters: Vec<Counters>,
}

/// Checks the guest's record in `ram` (vCPUs paused or not yet started): every control
/// block intact, every data page's stamp and fill matching its generation (the page in
/// progress may be one generation ahead), and each partition's generations summing to its
/// `writes` counter (or one more, between the table update and the counter update).
///
/// # Errors
///
/// The first inconsistency, with the page and the values found.
pub fn verify(ram: &GuestRam, cfg: &GuestConfig) -> Result<VerifyReport> {
    let l = cfg.layout()?;
    let counters = counters(ram, cfg.vcpus)?;
    let mut written_pages = 0;
    let mut page = vec![0u8; PAGE as usize];
    for (v, c) in counters.iter().enumerate() {
        let b = ctrl_gpa(v as u32);
        ensure!(
            ram.read_u64(b + ctrl::MAGIC) == Some(CTRL_MAGIC),
            "vCPU {v}: control block magic lost"
        );
        let base = v as u64 * l.part_pages;
        ensure!(
            (base..base + l.part_pages).contains(&c.cur_page),
            "vCPU {v}: cur_page {} outside its partition",
            c.cur_page
        );
        let mut sum: u64 = 0;
        for g in base..base + l.part_pages {
            let gen = ram
                .read_u64(TABLE_GPA + g * 8)
                .context("table outside RAM")?;
            sum = sum.wrapping_add(gen);
            let gpa = l.data_gpa + g * PAGE;
            let words = 2 + cfg.fill_words as usize;
            ram.read(gpa, &mut page[..words * 8])
                .context("data page outside RAM")?;
            let w = |i: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&page[i * 8..i * 8 + 8]);
                u64::from_le_bytes(b)
            };
            if gen > 0 {
                written_pages += 1;
            }
            if g == c.cur_page {
                // In progress: the stamp may be this generation or the next, partly filled.
                let ok_w0 = w(0) == g || (gen == 0 && w(0) == 0);
                let ok_w1 = w(1) == gen || w(1) == gen + 1;
                ensure!(
                    ok_w0 && ok_w1,
                    "vCPU {v}: page {g} (in progress) stamp ({}, {}) vs generation {gen}",
                    w(0),
                    w(1)
                );
                continue;
            }
            if gen == 0 {
                ensure!(
                    w(0) == 0 && w(1) == 0,
                    "page {g} never written but holds ({}, {})",
                    w(0),
                    w(1)
                );
                continue;
            }
            if w(0) != g || w(1) != gen {
                bail!(
                    "page {g} (GPA {gpa:#x}) holds stamp ({}, {}), the table says generation {gen}: stale or corrupt",
                    w(0),
                    w(1)
                );
            }
            let v0 = (g << 32) ^ gen;
            for i in 0..cfg.fill_words as usize {
                let want = v0.wrapping_add(i as u64);
                ensure!(
                    w(2 + i) == want,
                    "page {g} fill word {i} is {:#x}, expected {want:#x}",
                    w(2 + i)
                );
            }
        }
        ensure!(
            sum == c.writes || sum == c.writes + 1,
            "vCPU {v}: generations sum to {sum} but the guest counted {} writes",
            c.writes
        );
    }
    Ok(VerifyReport {
        pages: l.data_pages,
        written_pages,
        counters,
    })
}

/// Checks what a loaded guest's record says about its counters without reading the data
/// pages (vCPUs paused or not yet started): every control block intact, `cur_page` in its
/// partition, and each partition's generation table summing to its `writes` counter (or
/// one more). Reads the control blocks and the table (8 bytes per data page: 2 MiB for a
/// 1 GiB guest), so it fits in the downtime where [`verify`] (every data page) does not.
///
/// # Errors
///
/// The first inconsistency, with the vCPU and the values found.
pub fn check_counters(ram: &GuestRam, cfg: &GuestConfig) -> Result<VerifyReport> {
    let l = cfg.layout()?;
    let counters = counters(ram, cfg.vcpus)?;
    let mut written_pages = 0;
    for (v, c) in counters.iter().enumerate() {
        ensure!(
            ram.read_u64(ctrl_gpa(v as u32) + ctrl::MAGIC) == Some(CTRL_MAGIC),
            "vCPU {v}: control block magic lost"
        );
        let base = v as u64 * l.part_pages;
        ensure!(
            (base..base + l.part_pages).contains(&c.cur_page),
            "vCPU {v}: cur_page {} outside its partition",
            c.cur_page
        );
        let mut sum: u64 = 0;
        for g in base..base + l.part_pages {
            let gen = ram
                .read_u64(TABLE_GPA + g * 8)
                .context("table outside RAM")?;
            sum = sum.wrapping_add(gen);
            written_pages += u64::from(gen > 0);
        }
        ensure!(
            sum == c.writes || sum == c.writes + 1,
            "vCPU {v}: generations sum to {sum} but the guest counted {} writes",
            c.writes
        );
    }
    Ok(VerifyReport {
        pages: l.data_pages,
        written_pages,
        counters,
    })
}

/// What [`verify_running`] checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RunningReport {
    /// Data pages whose stamp and fill were checked against the table (the migrated
    /// content, or what the guest wrote over it since it started: both must match).
    pub checked: u64,
    /// Data pages the guest was writing while they were read (skipped: their migrated
    /// content is being replaced, and the guest never reads it).
    pub rewritten: u64,
}

/// Checks every data page's stamp and fill against its generation **while the guest
/// runs**, without a snapshot.
///
/// Per page `g` of vCPU `v`: load `t1 = table[g]`, the page's words, `cur_page[v]`, then
/// `t2 = table[g]`. The guest stores `cur_page = g`, then the stamp and fill, then
/// `table[g]`; on x86-64 (TSO) stores become visible in that order and these loads are
/// performed in program order (all volatile, so the compiler keeps the order too). So if
/// any load of the page saw a store of a write to `g`, either that write's `cur_page = g`
/// is visible to the `cur_page` load (it is still in progress), or the write has finished
/// and its table store is visible to the `t2` load (`t2 != t1`); a page with `t1 == t2`
/// and `cur_page != g` was read whole and untouched, and must match `t1` exactly. Pages
/// that fail that test are counted as rewritten, never as errors. The `writes` sums are
/// not checked here (they move): [`check_counters`] does that at load.
///
/// # Errors
///
/// The first page whose content contradicts its generation (a stale or corrupt page).
pub fn verify_running(ram: &GuestRam, cfg: &GuestConfig) -> Result<RunningReport> {
    let l = cfg.layout()?;
    let mut r = RunningReport::default();
    let words = 2 + cfg.fill_words;
    let mut w = vec![0u64; words as usize];
    for v in 0..cfg.vcpus {
        let cur = ctrl_gpa(v) + ctrl::CUR_PAGE;
        let base = u64::from(v) * l.part_pages;
        for g in base..base + l.part_pages {
            let table = TABLE_GPA + g * 8;
            let gpa = l.data_gpa + g * PAGE;
            let t1 = ram.read_u64(table).context("table outside RAM")?;
            for (i, x) in w.iter_mut().enumerate() {
                *x = ram
                    .read_u64(gpa + 8 * i as u64)
                    .context("data page outside RAM")?;
            }
            let c = ram.read_u64(cur).context("control block outside RAM")?;
            let t2 = ram.read_u64(table).context("table outside RAM")?;
            if t1 != t2 || c == g {
                r.rewritten += 1;
                continue;
            }
            r.checked += 1;
            if t1 == 0 {
                ensure!(
                    w[0] == 0 && w[1] == 0,
                    "page {g} never written but holds ({}, {})",
                    w[0],
                    w[1]
                );
                continue;
            }
            ensure!(
                w[0] == g && w[1] == t1,
                "page {g} (GPA {gpa:#x}) holds stamp ({}, {}), the table says generation {t1}: stale or corrupt",
                w[0],
                w[1]
            );
            let v0 = (g << 32) ^ t1;
            for (i, &x) in w[2..].iter().enumerate() {
                let want = v0.wrapping_add(i as u64);
                ensure!(
                    x == want,
                    "page {g} fill word {i} is {x:#x}, expected {want:#x}"
                );
            }
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_one_gib() {
        let cfg = GuestConfig {
            ram: 1 << 30,
            regions: 2,
            vcpus: 2,
            pattern: Pattern::Hot,
            hot_pages: 1000,
            burst: 64,
            fill_words: 8,
        };
        let l = cfg.layout().expect("valid");
        assert_eq!(l.data_gpa, 4 << 20); // 2 MiB tables region + 2 MiB generation table
        assert_eq!(l.data_pages, ((1 << 30) - (4 << 20)) / 4096);
        assert_eq!(
            cfg.region_layout(),
            vec![(0, 512 << 20), (512 << 20, 512 << 20)]
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        let ok = GuestConfig {
            ram: 64 << 20,
            regions: 1,
            vcpus: 2,
            pattern: Pattern::Sequential,
            hot_pages: 0,
            burst: 1,
            fill_words: 0,
        };
        assert!(ok.layout().is_ok());
        assert!(GuestConfig { ram: 3 << 20, ..ok }.layout().is_err());
        assert!(GuestConfig {
            fill_words: 511,
            ..ok
        }
        .layout()
        .is_err());
        assert!(GuestConfig {
            pattern: Pattern::Hot,
            ..ok
        }
        .layout()
        .is_err());
        assert!(GuestConfig { regions: 3, ..ok }.layout().is_err());
    }

    #[test]
    fn verify_catches_a_stale_page() {
        let cfg = GuestConfig {
            ram: 16 << 20,
            regions: 1,
            vcpus: 1,
            pattern: Pattern::Sequential,
            hot_pages: 0,
            burst: 1,
            fill_words: 2,
        };
        let ram = GuestRam::new_memfd(&cfg.region_layout()).expect("ram");
        install(&ram, &cfg).expect("install");
        let l = cfg.layout().expect("layout");
        // Emulate the guest writing page 5 twice and page 6 once; cur_page = 6.
        let stamp = |g: u64, gen: u64| {
            let a = l.data_gpa + g * PAGE;
            ram.write_u64(a, g).expect("w");
            ram.write_u64(a + 8, gen).expect("w");
            for i in 0..2 {
                ram.write_u64(a + 16 + 8 * i, ((g << 32) ^ gen) + i)
                    .expect("w");
            }
            ram.write_u64(TABLE_GPA + g * 8, gen).expect("w");
        };
        stamp(5, 1);
        stamp(5, 2);
        stamp(6, 1);
        let b = ctrl_gpa(0);
        ram.write_u64(b + ctrl::WRITES, 3).expect("w");
        ram.write_u64(b + ctrl::CUR_PAGE, 6).expect("w");
        let r = verify(&ram, &cfg).expect("consistent");
        assert_eq!(r.written_pages, 2);
        // A stale copy of page 5 (generation 1 content, table says 2) is caught.
        ram.write_u64(l.data_gpa + 5 * PAGE + 8, 1).expect("w");
        let e = verify(&ram, &cfg).expect_err("stale");
        assert!(e.to_string().contains("page 5"), "{e}");
        ram.write_u64(l.data_gpa + 5 * PAGE + 8, 2).expect("w");
        // A counter that went back is caught.
        ram.write_u64(b + ctrl::WRITES, 1).expect("w");
        assert!(verify(&ram, &cfg).is_err());
        assert!(check_counters(&ram, &cfg).is_err());
        ram.write_u64(b + ctrl::WRITES, 3).expect("w");
        let quick = check_counters(&ram, &cfg).expect("consistent");
        assert_eq!((quick.written_pages, quick.counters[0].writes), (2, 3));
        // The running check: page 6 is in progress (skipped), the rest are checked.
        let run = verify_running(&ram, &cfg).expect("consistent");
        assert_eq!(run.rewritten, 1);
        assert_eq!(run.checked, l.part_pages - 1);
        // A stale page is caught by the running check too.
        ram.write_u64(l.data_gpa + 5 * PAGE + 8, 1).expect("w");
        let e = verify_running(&ram, &cfg).expect_err("stale");
        assert!(e.to_string().contains("page 5"), "{e}");
    }
}
