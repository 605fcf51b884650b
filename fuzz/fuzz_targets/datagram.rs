#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fleetcall_fuzz::datagram::run(data));
