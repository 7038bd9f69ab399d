//! Non-panicking host calls for the request path.
//!
//! `proxy-wasm` 0.2.5's wrappers `panic!` on any status they do not expect and decode
//! header names with `unwrap()`; a panic traps the VM and fails every later request on
//! that worker. These wrappers call the same ABI functions and turn every status into a
//! value. They also avoid the SDK's per-header `String` allocations: the header map
//! comes back as one buffer that [`crate::headers::parse_map`] reads in place.
//!
//! This is the only module of the crate that uses `unsafe`: raw-pointer ABI calls, and
//! taking ownership of buffers the host allocated through the SDK's exported allocator
//! (`proxy_on_memory_allocate`, a boxed `[u8]` of exactly `size` bytes), exactly as the
//! SDK itself does.
#![allow(unsafe_code)]

use std::ptr::{null, null_mut};

use proxy_wasm::types::{MapType, Status, StreamType};

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: MapType,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> Status;
    fn proxy_get_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> Status;
    fn proxy_replace_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> Status;
    fn proxy_remove_header_map_value(map_type: MapType, key_data: *const u8, key_size: usize) -> Status;
    fn proxy_add_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> Status;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> Status;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> Status;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> Status;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> Status;
    fn proxy_set_effective_context(context_id: u32) -> Status;
    fn proxy_continue_stream(stream_type: StreamType) -> Status;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> Status;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> Status;
}

/// Takes ownership of a host-allocated buffer.
///
/// # Safety
/// `data` must be null or a buffer of `size` bytes allocated by the SDK's
/// `proxy_on_memory_allocate` (a `Box<[u8]>` of exactly `size`), not owned elsewhere.
unsafe fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

/// The whole header map in the proxy-wasm wire format, or `None` if unavailable.
pub fn header_map(map: MapType) -> Option<Vec<u8>> {
    let mut data = null_mut();
    let mut size = 0usize;
    // SAFETY: out-pointers are valid; the returned buffer is host-allocated for us.
    match unsafe { proxy_get_header_map_pairs(map, &mut data, &mut size) } {
        Status::Ok if data.is_null() => Some(0u32.to_le_bytes().to_vec()),
        Status::Ok => Some(unsafe { owned(data, size) }),
        _ => None,
    }
}

/// One header value as bytes.
pub fn header(map: MapType, name: &str) -> Option<Vec<u8>> {
    let mut data = null_mut();
    let mut size = 0usize;
    // SAFETY: as above; `name` outlives the call.
    match unsafe { proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut data, &mut size) } {
        Status::Ok => Some(unsafe { owned(data, size) }),
        _ => None,
    }
}

/// Sets a header, replacing every existing value.
pub fn set_header(map: MapType, name: &str, value: &[u8]) -> bool {
    // SAFETY: pointers and lengths describe live slices for the duration of the call.
    unsafe { proxy_replace_header_map_value(map, name.as_ptr(), name.len(), value.as_ptr(), value.len()) == Status::Ok }
}

/// Removes every value of a header.
pub fn remove_header(map: MapType, name: &str) -> bool {
    // SAFETY: as above.
    unsafe { proxy_remove_header_map_value(map, name.as_ptr(), name.len()) == Status::Ok }
}

/// Adds a header value (keeps existing ones: several `set-cookie`s).
pub fn add_header(map: MapType, name: &str, value: &[u8]) -> bool {
    // SAFETY: as above.
    unsafe { proxy_add_header_map_value(map, name.as_ptr(), name.len(), value.as_ptr(), value.len()) == Status::Ok }
}

/// A property by its path, already serialized as parts joined by NUL
/// (e.g. `b"upstream\0address"`).
pub fn property(path: &[u8]) -> Option<Vec<u8>> {
    let mut data = null_mut();
    let mut size = 0usize;
    // SAFETY: as above.
    match unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) } {
        Status::Ok if !data.is_null() => Some(unsafe { owned(data, size) }),
        _ => None,
    }
}

/// Sends a local reply. `headers` is a serialized header map.
pub fn send_local_response(status: u32, details: &str, headers: &[u8], body: &[u8]) -> bool {
    // SAFETY: as above.
    unsafe {
        proxy_send_local_response(
            status,
            if details.is_empty() { null() } else { details.as_ptr() },
            details.len(),
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        ) == Status::Ok
    }
}

pub fn increment(metric: u32, by: u64) -> bool {
    let by = i64::try_from(by).unwrap_or(i64::MAX);
    // SAFETY: plain values.
    unsafe { proxy_increment_metric(metric, by) == Status::Ok }
}

/// Host time in nanoseconds since the Unix epoch.
pub fn now_nanos() -> Option<u64> {
    let mut t = 0u64;
    // SAFETY: valid out-pointer.
    match unsafe { proxy_get_current_time_nanoseconds(&mut t) } {
        Status::Ok => Some(t),
        _ => None,
    }
}

/// Makes `context_id` the context later host calls of this callback act on (a paused
/// HTTP stream, from the root context). `false` when the context no longer exists.
pub fn set_effective_context(context_id: u32) -> bool {
    // SAFETY: plain value.
    unsafe { proxy_set_effective_context(context_id) == Status::Ok }
}

/// Resumes the (effective) context's paused request: Envoy continues decoding once the
/// current callback returns.
pub fn continue_request() -> bool {
    // SAFETY: plain value.
    unsafe { proxy_continue_stream(StreamType::HttpRequest) == Status::Ok }
}

/// The value of a process-wide shared-data key (per Envoy `vm_id`), if set.
pub fn shared_data(key: &str) -> Option<Vec<u8>> {
    let mut data = null_mut();
    let mut size = 0usize;
    let mut cas = 0u32;
    // SAFETY: as for `header`; `key` outlives the call.
    match unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) } {
        Status::Ok if !data.is_null() => Some(unsafe { owned(data, size) }),
        _ => None,
    }
}

/// Sets a shared-data key (last writer wins: no compare-and-swap).
pub fn set_shared_data(key: &str, value: &[u8]) -> bool {
    // SAFETY: pointers and lengths describe live slices for the duration of the call.
    unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), 0) == Status::Ok }
}
