//! Session descriptions as the control plane carries them between devices
//! and the SFU.
//!
//! The controller reads an SDP once, where it arrives from a device, into an
//! [`Sdp`]: never empty, and what the grant check needs (whether it sends
//! media) already known. Everything else in it is the media plane's
//! business: the SFU parses it fully at its own edge, and an SDP it cannot
//! use comes back as `SfuNotice::JoinFailed` or `SfuNotice::NegotiationFailed`
//! (see [`crate::controller::sfu`]), so the two parsers never have to agree.

use std::fmt;

use crate::Error;

/// A non-empty session description (an offer or an answer).
#[derive(Clone, PartialEq, Eq)]
pub struct Sdp {
    text: String,
    sends_media: bool,
}

impl Sdp {
    /// Checks and wraps an SDP: it must not be empty.
    pub fn new(text: impl Into<String>) -> Result<Sdp, Error> {
        let text = text.into();
        if text.is_empty() {
            return Err(Error::EmptySdp);
        }
        let sends_media = sends_media(&text);
        Ok(Sdp { text, sends_media })
    }

    /// Whether it sends media: an audio or video m-line that is not disabled
    /// (port 0) and whose direction is `sendrecv` (the default) or
    /// `sendonly`. Data channels do not count.
    pub fn sends_media(&self) -> bool {
        self.sends_media
    }

    /// The SDP text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The SDP text, for a frame to a device.
    pub fn into_string(self) -> String {
        self.text
    }
}

impl fmt::Debug for Sdp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sdp({:?})", self.text)
    }
}

impl fmt::Display for Sdp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

fn sends_media(sdp: &str) -> bool {
    let mut sends = false;
    let mut in_media: Option<bool> = None; // Some(enabled) inside an audio/video section
    let mut direction_sends = true;
    for line in sdp.lines().map(str::trim_end) {
        if let Some(m) = line.strip_prefix("m=") {
            if in_media == Some(true) && direction_sends {
                sends = true;
            }
            let mut fields = m.split_whitespace();
            let kind = fields.next().unwrap_or_default();
            let port = fields.next().unwrap_or_default();
            in_media = matches!(kind, "audio" | "video").then_some(port != "0");
            direction_sends = true;
        } else if in_media.is_some() {
            match line {
                "a=sendrecv" | "a=sendonly" => direction_sends = true,
                "a=recvonly" | "a=inactive" => direction_sends = false,
                _ => {}
            }
        }
    }
    sends || (in_media == Some(true) && direction_sends)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_that_send_media_are_recognised() {
        let section = |kind: &str, port: &str, dir: Option<&str>| {
            let mut s = format!("m={kind} {port} UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n");
            if let Some(dir) = dir {
                s.push_str(&format!("a={dir}\r\n"));
            }
            s
        };
        let head = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n";
        let sdp = |sections: &[String]| format!("{head}{}", sections.concat());
        assert!(sends_media(&sdp(&[section("audio", "9", Some("sendonly"))])));
        assert!(sends_media(&sdp(&[section("audio", "9", None)])), "sendrecv is the default");
        assert!(sends_media(&sdp(&[section("audio", "9", Some("recvonly")), section("video", "9", Some("sendrecv"))])));
        assert!(!sends_media(&sdp(&[section("audio", "9", Some("recvonly"))])));
        assert!(!sends_media(&sdp(&[section("audio", "9", Some("inactive"))])));
        assert!(!sends_media(&sdp(&[section("audio", "0", Some("sendonly"))])), "a rejected m-line sends nothing");
        assert!(!sends_media(&sdp(&[section("application", "9", None)])));
        // A session-level direction before the first m-line does not count.
        assert!(!sends_media(&format!("{head}a=sendrecv\r\n{}", section("audio", "9", Some("recvonly")))));
        assert!(!sends_media(""));
        // The wrapper reads it once and keeps the answer.
        assert!(Sdp::new(sdp(&[section("audio", "9", None)])).unwrap().sends_media());
        assert!(!Sdp::new(sdp(&[section("audio", "9", Some("recvonly"))])).unwrap().sends_media());
    }

    #[test]
    fn only_empty_text_is_refused() {
        assert!(matches!(Sdp::new(""), Err(Error::EmptySdp)));
        // Anything else goes on to the SFU, which judges it.
        for text in ["not sdp", "v=0\r\n", " "] {
            assert_eq!(Sdp::new(text).unwrap().as_str(), text);
        }
    }
}
