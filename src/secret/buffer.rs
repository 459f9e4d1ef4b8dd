//! `SecureBuffer`: one secret in its own locked, guarded, dump-excluded pages, readable only
//! inside `expose`, wiped before release; and the registry of live buffers.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::ops::Range;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};

use bytes::Bytes;

use super::allocator::wipe_bytes;
use super::error::{ErrorKind, SecretError};
use super::sys;

/// Largest secret accepted from a file or variable. Tokens and PEM keys are a few KiB; the
/// bound keeps locked memory (RLIMIT_MEMLOCK is 8 MiB for unprivileged processes) predictable.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;

/// memsec 0.7 writes a 16-byte canary right before the bytes it hands out (src/alloc/mod.rs,
/// `CANARY_SIZE`) and aborts in `free` when it changed. We read it to check it without dying.
const MEMSEC_CANARY_SIZE: usize = 16;

/// A secret in memory nothing else can see: page-aligned between two no-access guard pages,
/// behind a canary, locked in RAM (`mlock`), excluded from core dumps (`MADV_DONTDUMP`),
/// `PROT_NONE` except while a caller is inside [`expose`](Self::expose), and zeroed before
/// the pages are released. Not `Clone`, not `Serialize`; `Debug`/`Display` print a redaction.
///
/// Reading is cheap and safe from many threads at once: the first reader makes the pages
/// readable, the last one seals them again (an open count under a short mutex).
pub struct SecureBuffer {
    inner: Arc<Inner>,
}

struct Inner {
    id: u64,
    /// Where the secret came from ("secret file /run/secrets/token"); never the secret.
    label: String,
    /// memsec's user pointer: `capacity` bytes ending exactly at the trailing guard page.
    bytes: NonNull<u8>,
    capacity: usize,
    /// Bytes in use (≤ capacity); trimmed whitespace and unused capacity are zero.
    len: usize,
    /// The pages holding canary and bytes: locked, dump-excluded, sealed.
    data: Range<usize>,
    page: usize,
    /// `None` when mlock succeeded, else why it failed.
    lock_error: Option<io::Error>,
    excluded_from_dumps: bool,
    /// How many callers are inside `expose` (or a canary check). Guarded changes of the
    /// page protection happen while this lock is held.
    readers: Mutex<usize>,
    /// How many times the pages were made accessible (first reader in, or a write).
    windows_opened: AtomicU64,
    /// Live [`SecureBuffer::shared_bytes`] views (each also counts as a reader).
    views: AtomicUsize,
}

// SAFETY: `Inner` owns its allocation exclusively (the pointer is never handed out beyond a
// borrow inside `expose`). Shared access only reads the bytes, and every change of page
// protection or content happens under the `readers` mutex, so sharing across threads is sound.
unsafe impl Send for Inner {}
// SAFETY: see `Send`: `&Inner` only permits reads synchronised by the `readers` mutex.
unsafe impl Sync for Inner {}

/// Where a buffer lives, for the self-check to compare with `/proc/self/smaps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferRegion {
    pub id: u64,
    pub label: String,
    /// Canary + bytes, page-aligned: should be `lo`, `dd`, `Locked: > 0`, `---p` when sealed.
    pub data: Range<usize>,
    /// The no-access page below the data (underflow trap).
    pub leading_guard: Range<usize>,
    /// The no-access page right after the last byte (overflow trap).
    pub trailing_guard: Range<usize>,
    /// Whether our own `mlock` call succeeded.
    pub locked: bool,
    /// Whether our own `madvise(MADV_DONTDUMP)` call succeeded.
    pub excluded_from_dumps: bool,
    /// Whether a caller is inside `expose` right now (then the pages are readable).
    pub is_open: bool,
    /// How many times the pages have been made accessible so far; a change between two
    /// snapshots means the buffer was in use in between.
    pub windows_opened: u64,
}

/// A snapshot of the registry of live buffers (for metrics, status and the self-check).
#[derive(Debug, Clone, Default)]
pub struct RegistryStats {
    /// Live SecureBuffers.
    pub buffers: usize,
    /// Bytes of data pages whose `mlock` succeeded.
    pub locked_bytes: usize,
    /// Buffers whose `mlock` failed (secrets that could be swapped out).
    pub unlocked_buffers: usize,
    /// Times resealing pages to `PROT_NONE` failed since start (should stay 0).
    pub seal_failures: u64,
    pub regions: Vec<BufferRegion>,
}

/// A buffer's canary, checked now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanaryStatus {
    pub id: u64,
    pub label: String,
    pub intact: bool,
}

struct Registry {
    next_id: u64,
    buffers: BTreeMap<u64, Weak<Inner>>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next_id: 1,
    buffers: BTreeMap::new(),
});

static SEAL_FAILURES: AtomicU64 = AtomicU64::new(0);

/// The canary memsec uses for every allocation, captured from the first one; later buffers
/// must carry the same value (a check that our layout assumptions about memsec hold).
static MEMSEC_CANARY: OnceLock<[u8; MEMSEC_CANARY_SIZE]> = OnceLock::new();

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves the data consistent (counters, a map).
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The live buffers, their regions and lock state, now.
pub fn registry() -> RegistryStats {
    pin_registry().stats
}

/// The live buffers, kept alive (not released) until this is dropped, so that a self-check
/// can compare them with the kernel's view without a buffer disappearing in between.
pub struct PinnedRegistry {
    live: Vec<Arc<Inner>>,
    stats: RegistryStats,
}

impl PinnedRegistry {
    /// The snapshot taken when pinning.
    pub fn stats(&self) -> &RegistryStats {
        &self.stats
    }

    /// The pinned buffers' regions as they are now (open state and windows change).
    pub fn regions_now(&self) -> Vec<BufferRegion> {
        self.live.iter().map(|inner| inner.region()).collect()
    }

    /// Checks each pinned buffer's canary now (briefly opening it for reading).
    pub fn check_canaries(&self) -> Vec<CanaryStatus> {
        self.live
            .iter()
            .map(|inner| CanaryStatus {
                id: inner.id,
                label: inner.label.clone(),
                intact: inner.canary_intact(),
            })
            .collect()
    }
}

impl fmt::Debug for PinnedRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedRegistry")
            .field("stats", &self.stats)
            .finish()
    }
}

/// Pins every live buffer and snapshots the registry.
pub fn pin_registry() -> PinnedRegistry {
    let live = live_buffers();
    let stats = stats_of(live.iter().map(|inner| inner.region()).collect());
    PinnedRegistry { live, stats }
}

fn stats_of(regions: Vec<BufferRegion>) -> RegistryStats {
    RegistryStats {
        buffers: regions.len(),
        locked_bytes: regions
            .iter()
            .filter(|r| r.locked)
            .map(|r| r.data.len())
            .sum(),
        unlocked_buffers: regions.iter().filter(|r| !r.locked).count(),
        seal_failures: SEAL_FAILURES.load(Ordering::Relaxed),
        regions,
    }
}

/// Checks every live buffer's canary now (briefly opening each buffer for reading).
pub fn check_canaries() -> Vec<CanaryStatus> {
    pin_registry().check_canaries()
}

/// Strong references to the live buffers, taken under the registry lock and returned so that
/// they are dropped after it is released (dropping the last one unregisters, which locks).
fn live_buffers() -> Vec<Arc<Inner>> {
    let registry = lock(&REGISTRY);
    registry
        .buffers
        .values()
        .filter_map(Weak::upgrade)
        .collect()
}

impl SecureBuffer {
    /// Reads a secret file with `read(2)` straight into a new buffer — no `BufReader`,
    /// `String` or `Vec` on the way — then trims trailing whitespace and newlines by length.
    /// The file's mode (of the opened file; symlinks such as Kubernetes secret mounts are
    /// followed) must not grant group/other access unless `allow_insecure_permissions`.
    ///
    /// # Errors
    /// Not found, not a regular file, mode too open, empty, larger than [`MAX_SECRET_BYTES`],
    /// grew while being read, or an I/O error; each message names the path.
    pub fn from_file(
        path: &Path,
        allow_insecure_permissions: bool,
    ) -> Result<SecureBuffer, SecretError> {
        let error = SecretError::file(path);
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOCTTY)
            .open(path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => error(ErrorKind::NotFound),
                _ => error(ErrorKind::Io(e)),
            })?;
        // fstat of the descriptor we read from: no window between check and use.
        let metadata = file.metadata().map_err(|e| error(ErrorKind::Io(e)))?;
        if !metadata.file_type().is_file() {
            return Err(error(ErrorKind::NotARegularFile));
        }
        let mode = metadata.mode() & 0o7777;
        if mode & 0o077 != 0 && !allow_insecure_permissions {
            return Err(error(ErrorKind::InsecurePermissions {
                mode,
                path: path.display().to_string(),
            }));
        }
        let size = metadata.len();
        if size == 0 {
            return Err(error(ErrorKind::Empty));
        }
        let size = usize::try_from(size)
            .ok()
            .filter(|&s| s <= MAX_SECRET_BYTES)
            .ok_or_else(|| {
                error(ErrorKind::TooLarge {
                    size,
                    limit: MAX_SECRET_BYTES,
                })
            })?;
        // One spare byte: filling it means the file grew after fstat.
        let label = format!("secret file {}", path.display());
        SecureBuffer::build(&label, size + 1, |bytes| {
            let filled = read_into(&mut file, bytes).map_err(|e| error(ErrorKind::Io(e)))?;
            if filled == bytes.len() {
                return Err(error(ErrorKind::ChangedWhileReading));
            }
            match trimmed_len(&bytes[..filled]) {
                0 => Err(error(ErrorKind::Empty)),
                len => Ok(len),
            }
        })
    }

    /// Moves the value of environment variable `var` into a new buffer: copies it straight
    /// from the environment block, zeroes the original bytes in place (so `/proc/PID/environ`
    /// no longer shows them either), then removes the variable. Trailing whitespace is trimmed.
    ///
    /// Call it during start-up, before threads that may call libc's `getenv` exist (Rust's own
    /// `std::env` calls are serialised by std; foreign code such as a resolver is not).
    ///
    /// # Errors
    /// Variable unset, empty, larger than [`MAX_SECRET_BYTES`], or an invalid name.
    pub fn from_env(var: &str) -> Result<SecureBuffer, SecretError> {
        let error = |kind| SecretError::env(var, kind);
        if var.is_empty() || var.contains('=') {
            return Err(error(ErrorKind::InvalidVariableName));
        }
        let name = CString::new(var).map_err(|_| error(ErrorKind::InvalidVariableName))?;
        // SAFETY: `name` is a valid NUL-terminated string. The returned pointer stays valid
        // until the environment is modified, which this function does only at its end.
        let value = unsafe { libc::getenv(name.as_ptr()) };
        let Some(value) = NonNull::new(value.cast::<u8>()) else {
            return Err(error(ErrorKind::NotFound));
        };
        // SAFETY: getenv returns a NUL-terminated string.
        let len = unsafe { libc::strlen(value.as_ptr().cast()) };
        // SAFETY: `value` points to `len` initialised bytes of the environment block.
        let source = unsafe { std::slice::from_raw_parts(value.as_ptr(), len) };
        let label = format!("environment variable {var}");
        let result = if len > MAX_SECRET_BYTES {
            Err(error(ErrorKind::TooLarge {
                size: len as u64,
                limit: MAX_SECRET_BYTES,
            }))
        } else {
            SecureBuffer::build(&label, len.max(1), |bytes| {
                bytes[..len].copy_from_slice(source);
                match trimmed_len(&bytes[..len]) {
                    0 => Err(error(ErrorKind::Empty)),
                    trimmed => Ok(trimmed),
                }
            })
        };
        // SAFETY: the value's bytes live in writable memory (the initial environment on the
        // stack, or a string setenv allocated) and nothing else references them by now except
        // the environment itself, which we remove the variable from next.
        unsafe { wipe_bytes(value.as_ptr(), len) };
        // SAFETY: edition 2024 marks remove_var unsafe because other threads might read the
        // environment concurrently through libc. std serialises its own accesses; the
        // documented contract of this function is to run before foreign threads exist.
        unsafe { std::env::remove_var(var) };
        result
    }

    /// A buffer holding a copy of `bytes` (tests, generated secrets, the self-check's scratch
    /// buffer). The caller is responsible for its own copy.
    ///
    /// # Errors
    /// More than [`MAX_SECRET_BYTES`], or secure memory cannot be allocated or protected.
    pub fn from_slice(bytes: &[u8]) -> Result<SecureBuffer, SecretError> {
        SecureBuffer::build("generated secret", bytes.len().max(1), |buffer| {
            buffer[..bytes.len()].copy_from_slice(bytes);
            Ok(bytes.len())
        })
    }

    /// Allocates a buffer of `capacity` bytes, lets `fill` write the secret into it while it is
    /// writable, and keeps the first `n` bytes, where `fill` returns `Ok(n)`; the rest is
    /// zeroed. On error everything is wiped and released. `label` names the secret's origin in
    /// errors, `Debug` and the self-check.
    ///
    /// # Errors
    /// `fill`'s error, or secure memory cannot be allocated or sealed.
    pub fn build<E: From<SecretError>>(
        label: &str,
        capacity: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<SecureBuffer, E> {
        let mut inner = Inner::allocate(label, capacity)?;
        // SAFETY: freshly allocated and read-write (Inner::allocate leaves it so); nobody else
        // can reach `inner` yet, so this exclusive slice is the only access.
        let bytes = unsafe { std::slice::from_raw_parts_mut(inner.bytes.as_ptr(), capacity) };
        let len = fill(bytes)?.min(capacity);
        // SAFETY: `len..capacity` lies inside the exclusive region; wipe what is not kept.
        unsafe { wipe_bytes(inner.bytes.as_ptr().add(len), capacity - len) };
        inner.len = len;
        inner
            .protect(libc::PROT_NONE)
            .map_err(|e| SecretError::labelled(label, ErrorKind::Protect(e)))?;
        let inner = Arc::new(inner);
        lock(&REGISTRY)
            .buffers
            .insert(inner.id, Arc::downgrade(&inner));
        Ok(SecureBuffer { inner })
    }

    /// Runs `read` with the secret's bytes. The pages are readable only while some caller is
    /// inside `expose`; `read` must not keep copies it does not wipe.
    pub fn expose<R>(&self, read: impl FnOnce(&[u8]) -> R) -> R {
        let _open = self.inner.open();
        // SAFETY: `_open` keeps the pages readable until it drops after `read` returns; the
        // bytes are initialised and only written while the buffer is exclusively owned.
        let bytes =
            unsafe { std::slice::from_raw_parts(self.inner.bytes.as_ptr(), self.inner.len) };
        read(bytes)
    }

    /// The secret as [`Bytes`] that borrow the buffer's own pages — no copy. While any clone
    /// of the returned value lives, the pages stay readable (`PROT_READ`, still locked,
    /// guarded and dump-excluded); when the last clone drops they are sealed again. This is
    /// `expose` for a value that must outlive a closure, such as a header value cached for a
    /// burst of requests; the holder decides how long the window stays open.
    pub fn shared_bytes(&self) -> Bytes {
        Bytes::from_owner(View::new(self.inner.clone()))
    }

    /// Zeroes the secret in place; `expose` then shows zeroes (the self-check's round trip).
    /// Returns false, and changes nothing, while a [`shared_bytes`](Self::shared_bytes) view
    /// is alive: its readers must never see the bytes change under them.
    #[must_use]
    pub fn wipe(&mut self) -> bool {
        if self.inner.views.load(Ordering::Acquire) > 0 {
            return false;
        }
        self.inner.wipe();
        true
    }

    /// Length of the secret in bytes.
    pub fn len(&self) -> usize {
        self.inner.len
    }

    /// Whether the secret has no bytes (never true for buffers read from files or variables).
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// Whether `mlock` of this buffer succeeded (it cannot be swapped out).
    pub fn is_locked(&self) -> bool {
        self.inner.lock_error.is_none()
    }

    /// Why `mlock` failed for this buffer (`None` when it is locked).
    pub fn lock_error(&self) -> Option<&io::Error> {
        self.inner.lock_error.as_ref()
    }

    /// Where the secret came from, e.g. "secret file /run/secrets/token".
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    /// Identifier in the registry and self-check details.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// `self` if its pages are locked, else an error saying why and how to allow locking
    /// (what `memory.require_lock = true` turns into exit status 2).
    ///
    /// # Errors
    /// When `mlock` failed for this buffer.
    pub fn require_locked(self) -> Result<SecureBuffer, SecretError> {
        match &self.inner.lock_error {
            None => Ok(self),
            Some(error) => Err(SecretError::labelled(
                &self.inner.label,
                ErrorKind::LockFailed {
                    bytes: self.inner.data.len(),
                    error: io::Error::from_raw_os_error(error.raw_os_error().unwrap_or(0)),
                },
            )),
        }
    }

    /// Where the buffer lives (for tests of the sealed state).
    pub fn region(&self) -> BufferRegion {
        self.inner.region()
    }
}

impl fmt::Debug for SecureBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecureBuffer")
            .field("label", &self.inner.label)
            .field("locked", &self.is_locked())
            .field("bytes", &"[redacted]")
            .finish()
    }
}

impl fmt::Display for SecureBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Inner {
    /// Allocates through memsec (guard pages, canary, its own unchecked mlock/madvise), then
    /// checks the layout and repeats mlock/madvise to learn whether they succeeded. The data
    /// region is left read-write for `build` to fill.
    fn allocate(label: &str, capacity: usize) -> Result<Inner, SecretError> {
        if capacity > MAX_SECRET_BYTES + 1 {
            return Err(SecretError::labelled(
                label,
                ErrorKind::TooLarge {
                    size: capacity as u64,
                    limit: MAX_SECRET_BYTES,
                },
            ));
        }
        // SAFETY: memsec::malloc_sized returns None or a fresh allocation of `capacity`
        // bytes with its own guard pages; we own it until memsec::free in Drop.
        let allocation = unsafe { memsec::malloc_sized(capacity) }
            .ok_or_else(|| SecretError::labelled(label, ErrorKind::Alloc { bytes: capacity }))?;
        let bytes = allocation.cast::<u8>();
        let page = sys::page_size();
        let user = bytes.as_ptr() as usize;
        let data_start = (user - MEMSEC_CANARY_SIZE) & !(page - 1);
        let data_len = (capacity + MEMSEC_CANARY_SIZE).div_ceil(page) * page;
        // memsec places the bytes so that they end exactly where the trailing guard begins.
        assert_eq!(
            data_start + data_len,
            user + capacity,
            "memsec 0.7 layout: bytes end at the trailing guard page"
        );
        let id = {
            let mut registry = lock(&REGISTRY);
            let id = registry.next_id;
            registry.next_id += 1;
            id
        };
        let mut inner = Inner {
            id,
            label: label.to_owned(),
            bytes,
            capacity,
            len: 0,
            data: data_start..data_start + data_len,
            page,
            lock_error: None,
            excluded_from_dumps: false,
            readers: Mutex::new(0),
            windows_opened: AtomicU64::new(0),
            views: AtomicUsize::new(0),
        };
        // SAFETY: the canary lies inside our data region, readable right after malloc.
        let canary = unsafe { inner.read_canary() };
        let expected = *MEMSEC_CANARY.get_or_init(|| canary);
        assert_eq!(
            canary, expected,
            "memsec 0.7 layout: the canary precedes the bytes"
        );
        let start = data_start as *mut libc::c_void;
        // SAFETY: `start..start + data_len` is our page-aligned data region.
        inner.excluded_from_dumps =
            unsafe { libc::madvise(start, data_len, libc::MADV_DONTDUMP) } == 0;
        // SAFETY: as above; mlock only pins the pages (memsec already tried, unchecked).
        if unsafe { libc::mlock(start, data_len) } != 0 {
            inner.lock_error = Some(io::Error::last_os_error());
        }
        Ok(inner)
    }

    fn region(&self) -> BufferRegion {
        BufferRegion {
            id: self.id,
            label: self.label.clone(),
            data: self.data.clone(),
            leading_guard: self.data.start - self.page..self.data.start,
            trailing_guard: self.data.end..self.data.end + self.page,
            locked: self.lock_error.is_none(),
            excluded_from_dumps: self.excluded_from_dumps,
            is_open: *lock(&self.readers) > 0,
            windows_opened: self.windows_opened.load(Ordering::Relaxed),
        }
    }

    /// Sets the protection of the data region.
    fn protect(&self, protection: libc::c_int) -> io::Result<()> {
        // SAFETY: the data region is a page-aligned range of our own allocation; changing its
        // protection affects no other object.
        let result = unsafe {
            libc::mprotect(
                self.data.start as *mut libc::c_void,
                self.data.len(),
                protection,
            )
        };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Registers a reader; the first one makes the pages readable.
    fn open(&self) -> OpenGuard<'_> {
        let mut readers = lock(&self.readers);
        if *readers == 0 {
            // Failing to unprotect our own mapping means the kernel refused to split the VMA
            // (ENOMEM): reading would fault, so stop here instead.
            self.protect(libc::PROT_READ)
                .expect("mprotect(PROT_READ) on a SecureBuffer's own pages");
            self.windows_opened.fetch_add(1, Ordering::Relaxed);
        }
        *readers += 1;
        OpenGuard { inner: self }
    }

    /// Unregisters a reader; the last one seals the pages again.
    fn close(&self) {
        let mut readers = lock(&self.readers);
        *readers -= 1;
        if *readers == 0 {
            self.seal();
        }
    }

    fn seal(&self) {
        if let Err(error) = self.protect(libc::PROT_NONE) {
            SEAL_FAILURES.fetch_add(1, Ordering::Relaxed);
            tracing::error!(buffer = self.id, label = %self.label, %error, "cannot reseal secure buffer");
        }
    }

    /// Runs `write` with the pages read-write, excluding new readers meanwhile; readers that
    /// are already in (canary checks) read other bytes and keep read access throughout.
    fn with_write_access<R>(&self, write: impl FnOnce() -> R) -> R {
        let readers = lock(&self.readers);
        self.protect(libc::PROT_READ | libc::PROT_WRITE)
            .expect("mprotect(PROT_READ|PROT_WRITE) on a SecureBuffer's own pages");
        self.windows_opened.fetch_add(1, Ordering::Relaxed);
        let result = write();
        if *readers == 0 {
            self.seal();
        } else if let Err(error) = self.protect(libc::PROT_READ) {
            SEAL_FAILURES.fetch_add(1, Ordering::Relaxed);
            tracing::error!(buffer = self.id, %error, "cannot restore read-only secure buffer");
        }
        result
    }

    fn wipe(&self) {
        self.with_write_access(|| {
            // SAFETY: the bytes are writable inside with_write_access; readers inside
            // `expose` cannot exist for the only callers (`&mut SecureBuffer`, Drop).
            unsafe { wipe_bytes(self.bytes.as_ptr(), self.capacity) }
        });
    }

    /// Reads memsec's canary.
    ///
    /// # Safety
    /// The data region must be readable.
    unsafe fn read_canary(&self) -> [u8; MEMSEC_CANARY_SIZE] {
        let mut canary = [0u8; MEMSEC_CANARY_SIZE];
        // SAFETY: the canary occupies the 16 bytes before `bytes`, inside the data region,
        // which the caller guarantees is readable.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.bytes.as_ptr().sub(MEMSEC_CANARY_SIZE),
                canary.as_mut_ptr(),
                MEMSEC_CANARY_SIZE,
            );
        }
        canary
    }

    fn canary_intact(&self) -> bool {
        let Some(expected) = MEMSEC_CANARY.get() else {
            return false;
        };
        let _open = self.open();
        // SAFETY: `_open` keeps the region readable.
        let canary = unsafe { self.read_canary() };
        // Not secret, but compare in constant time anyway: it guards against forged overflows.
        subtle::ConstantTimeEq::ct_eq(&canary[..], &expected[..]).into()
    }
}

struct OpenGuard<'a> {
    inner: &'a Inner,
}

/// The owner behind [`SecureBuffer::shared_bytes`]: one reader registration held for as long
/// as `Bytes` clones point into the pages.
struct View {
    inner: Arc<Inner>,
}

impl View {
    fn new(inner: Arc<Inner>) -> View {
        // Count the view before the pages open, so `wipe` never runs while it exists.
        inner.views.fetch_add(1, Ordering::AcqRel);
        std::mem::forget(inner.open());
        View { inner }
    }
}

impl AsRef<[u8]> for View {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the reader registration taken in `View::new` keeps the pages readable until
        // `drop`; the bytes are initialised, and `wipe` refuses to write while a view exists
        // (the only other writer, `Inner::drop`, cannot run while this `Arc` lives).
        unsafe { std::slice::from_raw_parts(self.inner.bytes.as_ptr(), self.inner.len) }
    }
}

impl Drop for View {
    fn drop(&mut self) {
        self.inner.close();
        self.inner.views.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.inner.close();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        lock(&REGISTRY).buffers.remove(&self.id);
        // memsec::free reads the canary and must find the pages accessible, or it faults.
        if let Err(error) = self.protect(libc::PROT_READ | libc::PROT_WRITE) {
            // Cannot wipe or free safely: leak the (sealed, locked) pages rather than crash.
            tracing::error!(buffer = self.id, %error, "cannot unseal secure buffer to release it; leaking it sealed");
            return;
        }
        // SAFETY: exclusive (last reference) and writable: the bytes are ours to zero.
        unsafe { wipe_bytes(self.bytes.as_ptr(), self.capacity) };
        #[cfg(test)]
        tests::record_release(self);
        // SAFETY: allocated by memsec::malloc_sized, freed once, pages accessible again:
        // memsec checks the canary (aborting on corruption), munlocks, zeroes and frees.
        unsafe { memsec::free(self.bytes) };
        if sys::is_lock_all_applied() {
            // memsec::free munlocks the data pages, which would also undo mlockall for the
            // heap memory they return to. Lock them again; if they were unmapped in between,
            // mlock fails harmlessly (ENOMEM).
            // SAFETY: mlock only pins pages of whatever is mapped at this range.
            unsafe { libc::mlock(self.data.start as *const libc::c_void, self.data.len()) };
        }
    }
}

/// `read(2)` until EOF or `bytes` is full; returns how many bytes were read.
fn read_into(file: &mut File, bytes: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < bytes.len() {
        match file.read(&mut bytes[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Length of `bytes` without trailing ASCII whitespace (newline, CR, space, tab).
fn trimmed_len(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |last| last + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::procfs;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    // Run every unit test of the crate with the wiping allocator, as the binary does.
    #[global_allocator]
    static GLOBAL: crate::secret::WipingAllocator = crate::secret::WipingAllocator;

    fn secret_file(contents: &[u8], mode: u32) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, contents).unwrap();
        std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        file
    }

    fn data_mapping(region: &BufferRegion) -> Vec<procfs::Mapping> {
        let maps = procfs::smaps().unwrap();
        procfs::overlapping(&maps, &region.data)
            .into_iter()
            .cloned()
            .collect()
    }

    #[test]
    fn reads_a_file_and_trims_trailing_newlines() {
        let file = secret_file(b"Bearer abc123\r\n\n  ", 0o600);
        let buffer = SecureBuffer::from_file(file.path(), false).unwrap();
        assert_eq!(buffer.len(), 13);
        buffer.expose(|bytes| assert_eq!(bytes, b"Bearer abc123"));
        assert!(buffer.label().contains(&file.path().display().to_string()));
    }

    #[test]
    fn refuses_a_world_readable_file_unless_allowed() {
        let file = secret_file(b"token", 0o644);
        let error = SecureBuffer::from_file(file.path(), false).unwrap_err();
        assert!(error.is_insecure_permissions());
        let message = error.to_string();
        assert!(message.contains("0644"), "{message}");
        assert!(
            message.contains(&file.path().display().to_string()),
            "{message}"
        );
        assert!(message.contains("chmod 600"), "{message}");
        assert!(!message.contains("token\n"));
        assert!(SecureBuffer::from_file(file.path(), true).is_ok());
    }

    #[test]
    fn refuses_missing_empty_and_oversized_files() {
        let missing = SecureBuffer::from_file(Path::new("/nonexistent/token"), false).unwrap_err();
        assert!(missing.is_not_found());
        assert!(
            missing
                .to_string()
                .contains("/nonexistent/token: not found")
        );
        let blank = secret_file(b" \n\n", 0o600);
        assert!(
            SecureBuffer::from_file(blank.path(), false)
                .unwrap_err()
                .is_empty()
        );
        let empty = secret_file(b"", 0o400);
        assert!(
            SecureBuffer::from_file(empty.path(), false)
                .unwrap_err()
                .is_empty()
        );
        let large = secret_file(&vec![b'x'; MAX_SECRET_BYTES + 1], 0o600);
        let error = SecureBuffer::from_file(large.path(), false).unwrap_err();
        assert!(error.to_string().contains("too large"), "{error}");
        let directory = tempfile::tempdir().unwrap();
        std::fs::set_permissions(directory.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let error = SecureBuffer::from_file(directory.path(), false).unwrap_err();
        assert!(error.to_string().contains("not a regular file"), "{error}");
    }

    #[test]
    fn from_env_moves_the_value_and_removes_the_variable() {
        let var = "SPRINT_SIDECAR_TEST_SECRET_FROM_ENV";
        // SAFETY: test-only; std serialises its environment access and no foreign thread
        // reads this variable.
        unsafe { std::env::set_var(var, "Bearer from-env\n") };
        let buffer = SecureBuffer::from_env(var).unwrap();
        buffer.expose(|bytes| assert_eq!(bytes, b"Bearer from-env"));
        assert!(std::env::var_os(var).is_none());
        let error = SecureBuffer::from_env(var).unwrap_err();
        assert!(error.is_not_found());
        assert_eq!(
            error.to_string(),
            format!("environment variable {var}: not found")
        );
    }

    #[test]
    fn debug_and_display_are_redacted() {
        let buffer = SecureBuffer::from_slice(b"hunter2-secret").unwrap();
        let debug = format!("{buffer:?}");
        assert!(
            debug.contains("[redacted]") && !debug.contains("hunter2"),
            "{debug}"
        );
        assert_eq!(buffer.to_string(), "[redacted]");
    }

    #[test]
    fn region_is_locked_dump_excluded_and_sealed_between_guards() {
        let buffer = SecureBuffer::from_slice(b"sealed secret").unwrap();
        let region = buffer.region();
        assert!(region.data.start.is_multiple_of(sys::page_size()));
        assert!(
            buffer.is_locked(),
            "mlock failed: run the tests as root or raise RLIMIT_MEMLOCK"
        );
        let sealed = data_mapping(&region);
        assert_eq!(sealed.len(), 1, "{sealed:?}");
        assert_eq!(sealed[0].perms, "---p");
        assert!(
            sealed[0].has_flag("lo") && sealed[0].has_flag("dd"),
            "{:?}",
            sealed[0]
        );
        assert!(sealed[0].locked_kb > 0);
        let maps = procfs::smaps().unwrap();
        for guard in [&region.leading_guard, &region.trailing_guard] {
            let found = procfs::overlapping(&maps, guard);
            assert!(
                !found.is_empty() && found.iter().all(|m| m.is_no_access()),
                "{found:?}"
            );
            assert!(found.iter().all(|m| !m.has_flag("dd")));
        }
        let open_perms = buffer.expose(|_| data_mapping(&region)[0].perms.clone());
        assert_eq!(open_perms, "r--p");
        assert_eq!(data_mapping(&region)[0].perms, "---p");
    }

    #[test]
    fn registry_counts_buffers_and_locked_bytes() {
        let buffer = SecureBuffer::from_slice(&[7u8; 5000]).unwrap();
        let stats = registry();
        let region = stats.regions.iter().find(|r| r.id == buffer.id()).unwrap();
        assert_eq!(region.data.len(), 2 * sys::page_size());
        assert!(stats.buffers >= 1);
        assert!(stats.locked_bytes >= region.data.len());
        let id = buffer.id();
        drop(buffer);
        assert!(registry().regions.iter().all(|r| r.id != id));
    }

    #[test]
    fn concurrent_readers_share_one_open_window() {
        let buffer = Arc::new(SecureBuffer::from_slice(b"shared by readers").unwrap());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let buffer = Arc::clone(&buffer);
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        buffer.expose(|bytes| assert_eq!(bytes, b"shared by readers"));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(data_mapping(&buffer.region())[0].perms, "---p");
        assert!(!buffer.region().is_open);
    }

    #[test]
    fn wipe_zeroes_the_bytes_before_release() {
        let mut buffer = SecureBuffer::from_slice(&[0xA5; 100]).unwrap();
        assert!(buffer.wipe());
        buffer.expose(|bytes| assert!(bytes.iter().all(|&b| b == 0)));
        assert_eq!(data_mapping(&buffer.region())[0].perms, "---p");
    }

    /// (id, whether all bytes were zero) of each buffer at the moment Drop hands it back.
    static RELEASED: Mutex<Vec<(u64, bool)>> = Mutex::new(Vec::new());

    /// Called by `Inner::drop` (test builds only) between the wipe and `memsec::free`.
    pub(super) fn record_release(inner: &Inner) {
        // SAFETY: Drop calls this while the pages are read-write and still allocated.
        let bytes = unsafe { std::slice::from_raw_parts(inner.bytes.as_ptr(), inner.capacity) };
        let zero = bytes.iter().all(|&b| b == 0);
        RELEASED.lock().unwrap().push((inner.id, zero));
    }

    #[test]
    fn drop_wipes_the_bytes_before_releasing_the_pages() {
        let buffer = SecureBuffer::from_slice(&[0x5A; 3000]).unwrap();
        let id = buffer.id();
        drop(buffer);
        let released = RELEASED.lock().unwrap();
        assert_eq!(released.iter().find(|(i, _)| *i == id), Some(&(id, true)));
    }

    #[test]
    fn corrupted_canary_is_detected() {
        let buffer = SecureBuffer::from_slice(b"canary test").unwrap();
        let status = |id| check_canaries().into_iter().find(|c| c.id == id).unwrap();
        assert!(status(buffer.id()).intact);
        let inner = &buffer.inner;
        let original = {
            let _open = inner.open();
            // SAFETY: readable while open.
            unsafe { inner.read_canary() }
        };
        // SAFETY: writable inside with_write_access; the canary is inside the data region.
        inner.with_write_access(|| unsafe { *inner.bytes.as_ptr().sub(1) ^= 0xFF });
        assert!(!status(buffer.id()).intact);
        // Restore it, or memsec::free would abort the test process on drop.
        // SAFETY: as above.
        inner.with_write_access(|| unsafe { *inner.bytes.as_ptr().sub(1) = original[15] });
        assert!(status(buffer.id()).intact);
    }

    /// Name of the env var that turns `fault_child_entry` into a crashing child.
    const FAULT_CHILD: &str = "SPRINT_SIDECAR_SECURE_BUFFER_FAULT";

    /// Runs in a re-executed copy of this test binary: touches forbidden memory and must die.
    #[test]
    fn fault_child_entry() {
        let Ok(what) = std::env::var(FAULT_CHILD) else {
            return; // an ordinary test run: nothing to do
        };
        sys::set_core_limit(sys::ResourceLimit::fixed(0)).unwrap(); // no core file from the crash
        let buffer = SecureBuffer::from_slice(b"guarded secret").unwrap();
        let region = buffer.region();
        let address = match what.as_str() {
            "overflow" => region.trailing_guard.start,
            "underflow" => region.leading_guard.end - 1,
            "sealed" => buffer.inner.bytes.as_ptr() as usize,
            "canary_on_drop" => {
                let inner = &buffer.inner;
                // SAFETY: writable inside with_write_access; corrupts memsec's canary.
                inner.with_write_access(|| unsafe { *inner.bytes.as_ptr().sub(1) ^= 0xFF });
                drop(buffer); // memsec::free must abort
                std::process::exit(3);
            }
            other => panic!("unknown fault {other}"),
        };
        // SAFETY: deliberately invalid: the address is a guard page or sealed data; the
        // parent asserts that this read kills the process with SIGSEGV.
        let byte = unsafe { std::ptr::read_volatile(address as *const u8) };
        std::process::exit(i32::from(byte) + 3); // reached only if nothing faulted
    }

    fn run_fault_child(what: &str) -> std::process::ExitStatus {
        Command::new(std::env::current_exe().unwrap())
            .args(["fault_child_entry", "--test-threads=1", "--nocapture"])
            .env(FAULT_CHILD, what)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
    }

    #[test]
    fn reading_past_the_end_hits_the_guard_page() {
        assert_eq!(run_fault_child("overflow").signal(), Some(libc::SIGSEGV));
    }

    #[test]
    fn reading_before_the_start_hits_the_guard_page() {
        assert_eq!(run_fault_child("underflow").signal(), Some(libc::SIGSEGV));
    }

    #[test]
    fn reading_a_sealed_buffer_faults() {
        assert_eq!(run_fault_child("sealed").signal(), Some(libc::SIGSEGV));
    }

    #[test]
    fn corrupted_canary_aborts_on_release() {
        assert_eq!(
            run_fault_child("canary_on_drop").signal(),
            Some(libc::SIGABRT)
        );
    }

    #[test]
    fn require_locked_passes_a_locked_buffer_through() {
        let buffer = SecureBuffer::from_slice(b"x").unwrap();
        assert!(buffer.require_locked().is_ok());
    }
}
