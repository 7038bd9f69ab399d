//! The proxy-wasm glue (wasm32 only).
#![allow(unsafe_code)]

use std::ptr::null_mut;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, Status};

use crate::{Call, Variant};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { variant: Rc::new(Variant::Noop) }) });
}}

struct Root {
    variant: Rc<Variant>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let config = proxy_wasm::hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size)
            .ok()
            .flatten()
            .unwrap_or_default();
        match Variant::parse(&config) {
            Some(v) => {
                self.variant = Rc::new(v);
                true
            }
            None => {
                log::error!("noop-filter: configuration must be \"noop\" or \"hostcalls|<override>|<session>\"");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream { variant: self.variant.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    variant: Rc<Variant>,
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match &*self.variant {
            Variant::Noop => noop(),
            Variant::Repeat { call, n } => {
                noop();
                for i in 0..*n {
                    match call {
                        Call::Pairs => drop(std::hint::black_box(header_map(MapType::HttpRequestHeaders))),
                        Call::Get => drop(std::hint::black_box(header(MapType::HttpRequestHeaders, "x-session-token"))),
                        Call::Replace => {
                            set_header(
                                MapType::HttpRequestHeaders,
                                "x-bench-repeat",
                                if i % 2 == 0 { b"a" } else { b"b" },
                            );
                        }
                        Call::Time => drop(std::hint::black_box(now_nanos())),
                        Call::Property => {}
                    }
                }
            }
            Variant::HostCalls { override_value, session } => {
                // session-affinity reads the clock on its ticks, not per request.
                let map = header_map(MapType::HttpRequestHeaders);
                std::hint::black_box(map);
                set_header(MapType::HttpRequestHeaders, "x-gateway-destination-endpoint", override_value.as_bytes());
                set_header(MapType::HttpRequestHeaders, "x-session-id", session.as_bytes());
                set_header(MapType::HttpRequestHeaders, "x-session-affinity", b"sticky");
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match &*self.variant {
            Variant::HostCalls { .. } => {
                // One read of the response head (status, attempt count); the served
                // address only when a retry answered (never in this benchmark).
                let _ = std::hint::black_box(header_map(MapType::HttpResponseHeaders));
            }
            Variant::Repeat { call: Call::Property, n } => {
                for _ in 0..*n {
                    drop(std::hint::black_box(property(b"upstream\0address")));
                }
            }
            _ => {}
        }
        Action::Continue
    }
}

/// Arm B: read one header, set one.
fn noop() {
    let seen = header(MapType::HttpRequestHeaders, "x-session-token").map_or(0, |v| v.len());
    set_header(MapType::HttpRequestHeaders, "x-noop", if seen > 0 { b"1" } else { b"0" });
}

// Raw host calls, as session-affinity's `src/filter/raw.rs` makes them (the SDK's
// wrappers decode into `String`s and panic on unexpected statuses).

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(map_type: MapType, data: *mut *mut u8, size: *mut usize) -> Status;
    fn proxy_get_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        data: *mut *mut u8,
        size: *mut usize,
    ) -> Status;
    fn proxy_replace_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> Status;
    fn proxy_get_property(path_data: *const u8, path_size: usize, data: *mut *mut u8, size: *mut usize) -> Status;
    fn proxy_get_current_time_nanoseconds(time: *mut u64) -> Status;
}

/// Takes ownership of a buffer the host allocated through the SDK's allocator.
///
/// # Safety
/// `data` is null or a `size`-byte buffer from `proxy_on_memory_allocate`.
unsafe fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

fn header_map(map: MapType) -> Option<Vec<u8>> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: valid out-pointers; the buffer is ours.
    match unsafe { proxy_get_header_map_pairs(map, &mut data, &mut size) } {
        Status::Ok => Some(unsafe { owned(data, size) }),
        _ => None,
    }
}

fn header(map: MapType, name: &str) -> Option<Vec<u8>> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: as above.
    match unsafe { proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut data, &mut size) } {
        Status::Ok => Some(unsafe { owned(data, size) }),
        _ => None,
    }
}

fn set_header(map: MapType, name: &str, value: &[u8]) -> bool {
    // SAFETY: live slices for the duration of the call.
    unsafe { proxy_replace_header_map_value(map, name.as_ptr(), name.len(), value.as_ptr(), value.len()) == Status::Ok }
}

fn property(path: &[u8]) -> Option<Vec<u8>> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: as above.
    match unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) } {
        Status::Ok => Some(unsafe { owned(data, size) }),
        _ => None,
    }
}

fn now_nanos() -> u64 {
    let mut t = 0u64;
    // SAFETY: valid out-pointer.
    match unsafe { proxy_get_current_time_nanoseconds(&mut t) } {
        Status::Ok => t,
        _ => 0,
    }
}
