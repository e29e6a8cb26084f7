//! The C ABI of libvirt's lock drivers (`lock_driver.h`, version 1.0.0, unchanged since 2011;
//! the header is not installed, so the layout is written out here and its sizes asserted).
//!
//! Each entry point is a thin shim: it copies libvirt's arguments into owned Rust values, calls
//! the safe logic in [`crate::domain`], reports a failure through libvirt ([`crate::report`])
//! and returns -1; no panic crosses into C ([`guard`]). libvirtd loads the plugin with
//! `RTLD_NOW | RTLD_LOCAL` and reads the data symbol `virLockDriverImpl`.

use crate::config::Config;
use crate::domain::{self, code, Domain, PluginError, Value};
use crate::spawn::{TakeOutcome, TakeRequest};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::os::fd::{AsRawFd, IntoRawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::OnceLock;

/// `virLockManagerParam.type`.
mod param_type {
    pub const STRING: i32 = 0;
    pub const CSTRING: i32 = 1;
    pub const INT: i32 = 2;
    pub const LONG: i32 = 3;
    pub const UINT: i32 = 4;
    pub const ULONG: i32 = 5;
    pub const UUID: i32 = 7;
}

/// `VIR_LOCK_MANAGER_USES_STATE`: Release and Inquire return a state string.
const USES_STATE: c_uint = 1;
/// `VIR_LOCK_MANAGER_OBJECT_TYPE_DOMAIN`.
const OBJECT_TYPE_DOMAIN: c_uint = 0;
/// The ABI version this plugin implements (1.0.0).
const DRIVER_VERSION: c_uint = 1_000_000;

/// `virLockManager`: allocated by libvirt; `private_data` is ours between `New` and `Free`.
#[repr(C)]
#[derive(Debug)]
pub struct LockManager {
    driver: *const LockDriver,
    private_data: *mut c_void,
}

/// `virLockManagerParam`'s value.
#[repr(C)]
#[derive(Clone, Copy)]
pub union ParamValue {
    iv: c_int,
    l: i64,
    ui: c_uint,
    ul: u64,
    d: f64,
    s: *const c_char,
    uuid: [u8; 16],
}

/// `virLockManagerParam`.
#[repr(C)]
pub struct Param {
    kind: c_int,
    key: *const c_char,
    value: ParamValue,
}

impl std::fmt::Debug for ParamValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ParamValue")
    }
}

impl std::fmt::Debug for Param {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Param").field("kind", &self.kind).finish()
    }
}

type InitFn = unsafe extern "C" fn(c_uint, *const c_char, c_uint) -> c_int;
type DeinitFn = unsafe extern "C" fn() -> c_int;
type NewFn = unsafe extern "C" fn(*mut LockManager, c_uint, usize, *const Param, c_uint) -> c_int;
type FreeFn = unsafe extern "C" fn(*mut LockManager);
type AddResourceFn = unsafe extern "C" fn(
    *mut LockManager,
    c_uint,
    *const c_char,
    usize,
    *const Param,
    c_uint,
) -> c_int;
type AcquireFn =
    unsafe extern "C" fn(*mut LockManager, *const c_char, c_uint, c_int, *mut c_int) -> c_int;
type StateFn = unsafe extern "C" fn(*mut LockManager, *mut *mut c_char, c_uint) -> c_int;

/// `virLockDriver`.
#[repr(C)]
#[derive(Debug)]
pub struct LockDriver {
    version: c_uint,
    flags: c_uint,
    init: InitFn,
    deinit: DeinitFn,
    new: NewFn,
    free: FreeFn,
    add_resource: AddResourceFn,
    acquire: AcquireFn,
    release: StateFn,
    inquire: StateFn,
}

const _: () = assert!(std::mem::size_of::<Param>() == 32);
const _: () = assert!(std::mem::size_of::<ParamValue>() == 16);
const _: () = assert!(std::mem::size_of::<LockDriver>() == 72);
const _: () = assert!(std::mem::size_of::<LockManager>() == 16);

/// The driver table libvirt reads.
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static virLockDriverImpl: LockDriver = LockDriver {
    version: DRIVER_VERSION,
    flags: USES_STATE,
    init: drv_init,
    deinit: drv_deinit,
    new: drv_new,
    free: drv_free,
    add_resource: drv_add_resource,
    acquire: drv_acquire,
    release: drv_release,
    inquire: drv_inquire,
};

/// What `vmlock libvirt uninstall` looks for before removing a plugin file.
#[used]
static MARKER: [u8; 22] = *b"vmlock-libvirt-plugin:";

/// Loaded once by `drvInit`; read without a lock afterwards (also in the pre-exec child).
static CONFIG: OnceLock<Config> = OnceLock::new();

/// Runs `f`; a failure is reported to libvirt and becomes -1, and so does a panic, which never
/// unwinds into libvirt.
fn guard(f: impl FnOnce() -> Result<c_int, PluginError>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => value,
        Ok(Err(e)) => {
            crate::report::report(e.code, &e.message);
            -1
        }
        Err(_) => {
            crate::report::report(
                code::OPERATION_FAILED,
                "vmlock: internal error in the lock plugin (a bug; see libvirtd's log)",
            );
            -1
        }
    }
}

fn config() -> Result<&'static Config, PluginError> {
    CONFIG.get().ok_or_else(|| PluginError {
        code: code::OPERATION_FAILED,
        message: "vmlock: the lock plugin was not initialised".into(),
    })
}

/// Copies a C string (`None` for NULL).
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string valid for the call.
unsafe fn text(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// Copies libvirt's parameters.
///
/// # Safety
/// `params` points to `n` parameters valid for the call (or `n` is 0).
unsafe fn params(params: *const Param, n: usize) -> Vec<(String, Value)> {
    if params.is_null() || n == 0 {
        return Vec::new();
    }
    // SAFETY: `n` initialised parameters at `params`, by the caller's contract.
    let slice = unsafe { std::slice::from_raw_parts(params, n) };
    slice
        .iter()
        .map(|p| {
            // SAFETY: keys are NUL-terminated strings; each union member is read only for the
            // type libvirt tagged the parameter with.
            unsafe {
                let key = text(p.key).unwrap_or_default();
                let value = match p.kind {
                    param_type::STRING | param_type::CSTRING => Value::Text(text(p.value.s)),
                    param_type::INT => Value::Number(p.value.iv.into()),
                    param_type::UINT => Value::Number(p.value.ui.into()),
                    param_type::LONG => Value::Number(p.value.l.into()),
                    param_type::ULONG => Value::Number(p.value.ul.into()),
                    param_type::UUID => Value::Uuid(p.value.uuid),
                    _ => Value::Other,
                };
                (key, value)
            }
        })
        .collect()
}

/// The domain `New` stored in `man`.
///
/// # Safety
/// `man` is NULL or a manager libvirt passes between `New` and `Free`.
unsafe fn domain<'a>(man: *mut LockManager) -> Result<&'a mut Domain, PluginError> {
    // SAFETY: libvirt's manager; `private_data` is NULL or the Box `drv_new` stored.
    let data = unsafe { man.as_mut() }
        .map(|m| m.private_data.cast::<Domain>())
        .filter(|d| !d.is_null());
    match data {
        // SAFETY: the Box from `drv_new`, alive until `drv_free`; libvirt uses a manager from
        // one thread at a time.
        Some(d) => Ok(unsafe { &mut *d }),
        None => Err(PluginError {
            code: code::OPERATION_FAILED,
            message: "vmlock: lock manager without a domain".into(),
        }),
    }
}

/// Hands `value` to libvirt in `*out`, allocated with `malloc` (libvirt frees it with `free`).
///
/// # Safety
/// `out` is a valid pointer to a `char *`.
unsafe fn give(out: *mut *mut c_char, value: Option<String>) -> Result<(), PluginError> {
    let copy = match value {
        None => std::ptr::null_mut(),
        Some(v) => {
            let c = CString::new(v).map_err(|_| PluginError {
                code: code::OPERATION_FAILED,
                message: "vmlock: lock state with a NUL byte".into(),
            })?;
            // SAFETY: strdup copies a NUL-terminated string into malloc'ed memory.
            let p = unsafe { nix::libc::strdup(c.as_ptr()) };
            if p.is_null() {
                return Err(PluginError {
                    code: code::OPERATION_FAILED,
                    message: "vmlock: out of memory".into(),
                });
            }
            p
        }
    };
    // SAFETY: `out` is valid by the caller's contract.
    unsafe { *out = copy };
    Ok(())
}

unsafe extern "C" fn drv_init(
    version: c_uint,
    config_file: *const c_char,
    _flags: c_uint,
) -> c_int {
    guard(|| {
        if version / 1_000_000 != DRIVER_VERSION / 1_000_000 {
            return Err(PluginError {
                code: code::CONFIG_UNSUPPORTED,
                message: format!("vmlock: lock driver ABI version {version} is not supported"),
            });
        }
        // SAFETY: libvirt passes NULL or the configuration file's name.
        let path = unsafe { text(config_file) }.map_or_else(
            || PathBuf::from("/etc/libvirt/qemu-vmlock.conf"),
            PathBuf::from,
        );
        let loaded = Config::load(&path).map_err(|e| PluginError {
            code: code::CONFIG_UNSUPPORTED,
            message: format!("vmlock: {e}"),
        })?;
        // A second Init (another driver loading the plugin) keeps the first configuration.
        let _ = CONFIG.set(loaded);
        Ok(0)
    })
}

unsafe extern "C" fn drv_deinit() -> c_int {
    // Kept loaded: the configuration is a process-wide value that cannot be unloaded safely.
    -1
}

unsafe extern "C" fn drv_new(
    man: *mut LockManager,
    kind: c_uint,
    nparams: usize,
    raw: *const Param,
    _flags: c_uint,
) -> c_int {
    guard(|| {
        if kind != OBJECT_TYPE_DOMAIN {
            return Err(PluginError {
                code: code::CONFIG_UNSUPPORTED,
                message: format!("vmlock: unknown lock object type {kind}"),
            });
        }
        // SAFETY: libvirt passes `nparams` parameters valid for this call.
        let d = Domain::new(&unsafe { params(raw, nparams) })?;
        // SAFETY: libvirt's manager for this call; the Box is freed in `drv_free`.
        match unsafe { man.as_mut() } {
            Some(m) => m.private_data = Box::into_raw(Box::new(d)).cast(),
            None => {
                return Err(PluginError {
                    code: code::OPERATION_FAILED,
                    message: "vmlock: no lock manager".into(),
                })
            }
        }
        Ok(0)
    })
}

unsafe extern "C" fn drv_free(man: *mut LockManager) {
    // SAFETY: libvirt's manager; `private_data` is NULL or the Box from `drv_new`, freed once.
    let _ = catch_unwind(AssertUnwindSafe(|| unsafe {
        if let Some(m) = man.as_mut() {
            if !m.private_data.is_null() {
                drop(Box::from_raw(m.private_data.cast::<Domain>()));
                m.private_data = std::ptr::null_mut();
            }
        }
    }));
}

unsafe extern "C" fn drv_add_resource(
    man: *mut LockManager,
    kind: c_uint,
    name: *const c_char,
    nparams: usize,
    raw: *const Param,
    flags: c_uint,
) -> c_int {
    guard(|| {
        let config = config()?;
        // SAFETY: the manager, name and parameters libvirt passes for this call.
        let (d, name, params) = unsafe { (domain(man)?, text(name), params(raw, nparams)) };
        let name = name.ok_or_else(|| PluginError {
            code: code::OPERATION_FAILED,
            message: "vmlock: resource without a name".into(),
        })?;
        d.add_resource(config, kind, &name, &params, flags)?;
        Ok(0)
    })
}

unsafe extern "C" fn drv_acquire(
    man: *mut LockManager,
    state: *const c_char,
    flags: c_uint,
    action: c_int,
    _fd: *mut c_int,
) -> c_int {
    guard(|| {
        let config = config()?;
        // SAFETY: the manager and state libvirt passes for this call.
        let (d, state) = unsafe { (domain(man)?, text(state)) };
        if flags & domain::ACQUIRE_REGISTER_ONLY != 0 {
            // libvirt's pre-exec child: the leases are taken before QEMU opens a disk, by this
            // process itself (then handed down to the holder it starts), or by the holder.
            // Nothing is handed to QEMU through `*fd`: it stays -1.
            let action = domain::lock_failure_action(action)?;
            d.check_leases(config)?;
            let descriptions = match fast_start(config, d, action) {
                TakeOutcome::Held(descriptions) => descriptions,
                TakeOutcome::Refused(e) => return Err(e.into()),
                TakeOutcome::UseHolder => holder_start(config, d, action)?,
            };
            // QEMU keeps copies of its lock descriptions across the exec: its locks then end
            // with it and nothing else, whatever happens to its holder or to vmlockd.
            for fd in descriptions {
                let _ = nix::fcntl::fcntl(
                    fd.as_raw_fd(),
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                );
                let _ = fd.into_raw_fd();
            }
            return Ok(0);
        }
        d.acquire(config, state.as_deref())?;
        Ok(0)
    })
}

/// The pre-exec child takes the leases itself and hands them down to the holder it starts
/// (see [`crate::spawn::take_and_hand_down`]), unless it cannot tell a fresh start.
fn fast_start(config: &Config, d: &Domain, action: vmlock::LockFailureAction) -> TakeOutcome {
    // A pause needs libvirt's connection to be carried out: the holder's start names the gap.
    if action == vmlock::LockFailureAction::Pause && d.uri.is_none() {
        return TakeOutcome::UseHolder;
    }
    let Ok(runtime) = vmlock_client::RuntimeDir::resolve(Some(&config.runtime_dir)) else {
        return TakeOutcome::UseHolder;
    };
    let (vm, flags) = d.registration(action);
    let args = d.takeover_args(config, action);
    let control = vmlock_client::control::socket_path(&config.runtime_dir, &d.uuid);
    crate::spawn::take_and_hand_down(&TakeRequest {
        runtime: &runtime,
        vm,
        resources: d.resources.clone(),
        flags,
        holder_args: &args,
        control: &control,
    })
}

/// The holder's own start: it takes the leases and reports; this child waits for the report.
fn holder_start(
    config: &Config,
    d: &Domain,
    action: vmlock::LockFailureAction,
) -> Result<Vec<std::os::fd::OwnedFd>, PluginError> {
    crate::spawn::start_holder(&d.holder_args(config, action), crate::spawn::READY_TIMEOUT).map_err(
        |reason| PluginError {
            code: if reason.contains("held by") || reason.contains("is locked") {
                code::RESOURCE_BUSY
            } else {
                code::OPERATION_FAILED
            },
            message: format!("vmlock: {reason}"),
        },
    )
}

unsafe extern "C" fn drv_release(
    man: *mut LockManager,
    state: *mut *mut c_char,
    _flags: c_uint,
) -> c_int {
    guard(|| {
        let config = config()?;
        // SAFETY: the manager libvirt passes for this call.
        let d = unsafe { domain(man)? };
        let result = d.release(config, !state.is_null())?;
        if !state.is_null() {
            // SAFETY: libvirt passed a valid `char **`.
            unsafe { give(state, result)? };
        }
        Ok(0)
    })
}

unsafe extern "C" fn drv_inquire(
    man: *mut LockManager,
    state: *mut *mut c_char,
    _flags: c_uint,
) -> c_int {
    guard(|| {
        let config = config()?;
        // SAFETY: the manager libvirt passes for this call.
        let d = unsafe { domain(man)? };
        if state.is_null() {
            return Err(PluginError {
                code: code::OPERATION_FAILED,
                message: "vmlock: inquire without a place for the state".into(),
            });
        }
        let result = d.inquire(config)?;
        // SAFETY: libvirt passed a valid `char **`.
        unsafe { give(state, result)? };
        Ok(0)
    })
}
