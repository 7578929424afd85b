#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tqproxy_fuzz::control(data));
