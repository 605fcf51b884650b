//! The steady state allocates nothing: a counting global allocator watches
//! every per-packet call after warm-up.

// A global allocator needs `unsafe impl`; it only forwards to the system
// allocator and counts.
#![allow(unsafe_code)]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::*;
use fleetcall_dsp::{EncoderMode, Pipeline, PipelineConfig};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

// One test in this binary, so no other thread allocates while counting.
#[test]
fn steady_state_does_not_allocate() {
    let packets = encode(&sender(1, true), &talker(3.0, 4), FRAME, 1);
    let low_delay = PipelineConfig {
        fec: false,
        encoder_mode: EncoderMode::LowDelay,
        ..PipelineConfig::default()
    };
    for config in [
        PipelineConfig::default(),
        low_delay,
        PipelineConfig {
            dtx: true,
            ..PipelineConfig::default()
        },
    ] {
        let mut pipeline = Pipeline::new(config).unwrap();
        let mut out = Vec::with_capacity(4000);
        for packet in &packets[..20] {
            pipeline.process(packet, &mut out).unwrap();
        }
        ALLOCATIONS.store(0, Ordering::Relaxed);
        COUNTING.store(true, Ordering::Relaxed);
        for (i, packet) in packets[20..].iter().enumerate() {
            if i % 10 == 0 {
                pipeline.process_lost(Some(packet), &mut out).unwrap();
            }
            pipeline.process(packet, &mut out).unwrap();
            if i == 50 {
                pipeline.set_suppression(false);
            }
            if i == 80 {
                pipeline.set_suppression(true);
            }
        }
        COUNTING.store(false, Ordering::Relaxed);
        assert_eq!(ALLOCATIONS.load(Ordering::Relaxed), 0, "{config:?}");
    }
}
