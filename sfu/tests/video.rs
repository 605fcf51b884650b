//! VP8 video is forwarded, and a new subscriber makes the SFU ask the
//! publisher for a keyframe so the subscriber can start decoding.

mod common;

use std::time::Duration;

use common::{init_log, Net};

#[test]
fn new_video_subscriber_triggers_a_keyframe_request() {
    init_log();
    let mut net = Net::new(Duration::from_secs(5));
    let camera = net.join_with("radiology", true);
    net.run(Duration::from_secs(1));
    assert_eq!(net.clients[camera].keyframe_requests, 0, "nobody watches yet");

    let viewer = net.join("radiology");
    assert!(
        net.run_until(Duration::from_secs(5), |n| n.clients[viewer].video_frames >= 20),
        "viewer receives video frames: {}",
        net.clients[viewer].video_frames
    );
    assert!(net.clients[camera].keyframe_requests >= 1, "publisher was asked for a keyframe");
    let stats = net.stats();
    assert_eq!(stats.tracks, 3, "camera audio + video, viewer audio");
    assert_eq!(stats.forwarding_entries, 3);
}
