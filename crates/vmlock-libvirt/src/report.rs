//! Errors reported to libvirt, so `virsh` shows vmlock's own message.
//!
//! libvirt's error functions are private symbols: linking against them would tie the plugin to
//! one libvirt build. `virReportErrorHelper` is looked up at run time in the process instead
//! (`dlsym(RTLD_DEFAULT)`); where it is missing (a test harness) the message goes to stderr,
//! which libvirtd logs.

use std::ffi::{c_char, c_int, CString};

/// `VIR_FROM_LOCKING`: errors of the lock manager.
const FROM_LOCKING: c_int = 42;

type ReportErrorHelper = unsafe extern "C" fn(
    domcode: c_int,
    errorcode: c_int,
    filename: *const c_char,
    funcname: *const c_char,
    linenr: usize,
    fmt: *const c_char,
    ...
);

/// Reports `message` to libvirt as an error with `code` (`virErrorNumber`).
pub fn report(code: i32, message: &str) {
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks a symbol up.
    let symbol =
        unsafe { nix::libc::dlsym(nix::libc::RTLD_DEFAULT, c"virReportErrorHelper".as_ptr()) };
    if symbol.is_null() {
        eprintln!("vmlock: {message}");
        return;
    }
    // SAFETY: libvirt's virReportErrorHelper has this signature (virerror.h: two ints, two
    // strings, a size_t line and a printf format with its arguments); the format is "%s" with
    // one NUL-terminated string, so no user text is read as a format.
    unsafe {
        let helper: ReportErrorHelper = std::mem::transmute(symbol);
        helper(
            FROM_LOCKING,
            code,
            c"vmlock-libvirt".as_ptr(),
            c"vmlock".as_ptr(),
            0,
            c"%s".as_ptr(),
            text.as_ptr(),
        );
    }
}
