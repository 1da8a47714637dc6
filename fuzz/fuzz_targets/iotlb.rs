#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vswitch::fuzzing::iotlb::fuzz(data));
