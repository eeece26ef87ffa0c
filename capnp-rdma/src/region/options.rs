//! How to create or open a region.

use std::path::PathBuf;

/// Huge page policy for a new region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum HugePages {
    /// Ordinary pages.
    #[default]
    Off,
    /// Explicit 2 MiB huge pages (memfd only) if the system has them reserved, else ordinary
    /// pages with transparent huge pages requested. [`Region::huge_pages`](super::Region::huge_pages) tells which.
    Prefer,
    /// Explicit 2 MiB huge pages or a [`RegionError::HugePagesUnavailable`](super::RegionError::HugePagesUnavailable) error.
    Require,
}

/// What backs a region's memory.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Backing {
    /// An anonymous memfd: shared with other processes by passing its descriptor
    /// ([`Region::fd`](super::Region::fd), e.g. over a Unix socket with SCM_RIGHTS, or by inheritance).
    Memfd,
    /// A named POSIX shared memory object (`/dev/shm/NAME`), opened by name with
    /// [`Region::open_shm`](super::Region::open_shm). The creator unlinks the name when it drops the region unless
    /// [`RegionOptions::keep_name`] is set.
    Shm(String),
    /// A file, for persistence across restarts; reopened with [`Region::open_path`](super::Region::open_path).
    File(PathBuf),
}

/// How to create a region.
#[derive(Clone, Debug)]
pub struct RegionOptions {
    pub(crate) backing: Backing,
    pub(crate) size: u64,
    pub(crate) block_size: u64,
    pub(crate) huge_pages: HugePages,
    pub(crate) mlock: bool,
    pub(crate) prefault: bool,
    pub(crate) keep_name: bool,
    pub(crate) inline_scrub_limit: u64,
}

impl RegionOptions {
    fn new(backing: Backing, size: u64) -> Self {
        Self {
            backing,
            size,
            block_size: 64 << 10,
            huge_pages: HugePages::Off,
            mlock: false,
            prefault: true,
            keep_name: false,
            inline_scrub_limit: 4 << 10,
        }
    }

    /// An anonymous memfd region of `size` bytes.
    pub fn memfd(size: u64) -> Self {
        Self::new(Backing::Memfd, size)
    }

    /// A region in the named POSIX shm object `name` (created exclusively).
    pub fn shm(name: impl Into<String>, size: u64) -> Self {
        Self::new(Backing::Shm(name.into()), size)
    }

    /// A region in a new file at `path` (created exclusively).
    pub fn file(path: impl Into<PathBuf>, size: u64) -> Self {
        Self::new(Backing::File(path.into()), size)
    }

    /// Block size: a power of two from 4 KiB to 2 MiB (default 64 KiB).
    pub fn block_size(mut self, bytes: u64) -> Self {
        self.block_size = bytes;
        self
    }

    /// Huge page policy (default [`HugePages::Off`]).
    pub fn huge_pages(mut self, policy: HugePages) -> Self {
        self.huge_pages = policy;
        self
    }

    /// Lock the region in memory with mlock (default off).
    pub fn mlock(mut self, on: bool) -> Self {
        self.mlock = on;
        self
    }

    /// Fault every page in at creation (default on). Turning it off moves page faults onto
    /// the first write of each page.
    pub fn prefault(mut self, on: bool) -> Self {
        self.prefault = on;
        self
    }

    /// Keep the shm name when the creator drops the region (default: unlink it).
    pub fn keep_name(mut self, keep: bool) -> Self {
        self.keep_name = keep;
        self
    }

    /// Releases that dirtied at most this many bytes are zeroed inline instead of by the
    /// background scrubber (default 4 KiB): cheaper than a hand-off for tiny segments.
    pub fn inline_scrub_limit(mut self, bytes: u64) -> Self {
        self.inline_scrub_limit = bytes;
        self
    }
}

/// How to open an existing region.
#[derive(Clone, Copy, Debug)]
pub struct OpenOptions {
    /// Fault every page in (default on).
    pub prefault: bool,
    /// Lock the mapping in memory (default off).
    pub mlock: bool,
    /// See [`RegionOptions::inline_scrub_limit`].
    pub inline_scrub_limit: u64,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            prefault: true,
            mlock: false,
            inline_scrub_limit: 4 << 10,
        }
    }
}
