//! The DSP thread pool: runs the noise-suppression pipelines the cores ask
//! for, off the workers' threads, so that a worker never spends its time
//! denoising one room while packets of other rooms wait.
//!
//! Each track is pinned to one DSP thread by a hash of its key; that thread
//! owns the track's [`TrackProcessor`], so no locks. What a pipeline produces
//! goes back to the worker that sent the packet, on that worker's channel.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use fleetcall_dsp::{PipelineConfig, TrackMeters};
use fleetcall_sfu::audio::{AudioCommand, AudioTotals, ProcessedAudio, TrackProcessor};
use fleetcall_sfu::TrackKey;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// What a pipeline produced for one packet of a track (maybe nothing):
/// answered once per `Process` command, so the core's queue bound holds.
pub type Produced = (TrackKey, Vec<ProcessedAudio>);

/// Meters of every processed track, from all DSP threads.
pub type MeterSnapshot = Vec<(TrackKey, TrackMeters)>;

enum PoolMessage {
    /// From worker `worker`, whose channel gets the results.
    Command { command: AudioCommand, worker: usize },
    Meters(std_mpsc::Sender<MeterSnapshot>),
    Totals(std_mpsc::Sender<AudioTotals>),
}

impl std::fmt::Debug for PoolMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PoolMessage")
    }
}

/// DSP threads running the pipelines of processed tracks. The threads stop
/// when the pool is dropped.
#[derive(Debug)]
pub struct AudioPool {
    threads: Vec<(std_mpsc::Sender<PoolMessage>, JoinHandle<()>)>,
}

impl AudioPool {
    /// Starts `threads` DSP threads; results for worker `i` go to `results[i]`.
    pub fn start(threads: usize, config: PipelineConfig, results: Vec<mpsc::UnboundedSender<Produced>>) -> std::io::Result<AudioPool> {
        let results: Arc<[_]> = results.into();
        let mut pool = Vec::new();
        for index in 0..threads.max(1) {
            let (tx, rx) = std_mpsc::channel();
            let results = results.clone();
            let thread = std::thread::Builder::new().name(format!("dsp-{index}")).spawn(move || run_dsp_thread(rx, config, &results))?;
            pool.push((tx, thread));
        }
        Ok(AudioPool { threads: pool })
    }

    /// Hands a command from worker `worker` to the thread owning its track.
    pub fn send(&self, command: AudioCommand, worker: usize) {
        let mut hasher = DefaultHasher::new();
        command.track().hash(&mut hasher);
        let index = (hasher.finish() % self.threads.len() as u64) as usize;
        // A stopped thread only happens at shutdown; the packet is moot then.
        let _ = self.threads[index].0.send(PoolMessage::Command { command, worker });
    }

    /// Meters of every processed track. Blocks until every thread answered.
    pub fn meters(&self) -> MeterSnapshot {
        let mut all = Vec::new();
        for (tx, _) in &self.threads {
            let (reply, rx) = std_mpsc::channel();
            if tx.send(PoolMessage::Meters(reply)).is_ok() {
                all.extend(rx.recv().unwrap_or_default());
            }
        }
        all
    }

    /// Totals over every thread, for metrics. Blocks until every thread
    /// answered.
    pub fn totals(&self) -> AudioTotals {
        let mut all = AudioTotals::default();
        for (tx, _) in &self.threads {
            let (reply, rx) = std_mpsc::channel();
            if tx.send(PoolMessage::Totals(reply)).is_ok()
                && let Ok(totals) = rx.recv()
            {
                all.merge(&totals);
            }
        }
        all
    }
}

fn run_dsp_thread(rx: std_mpsc::Receiver<PoolMessage>, config: PipelineConfig, results: &[mpsc::UnboundedSender<Produced>]) {
    let mut tracks: HashMap<TrackKey, TrackProcessor> = HashMap::new();
    // Counters of closed tracks live on here; live tracks are added on demand.
    let mut totals = AudioTotals::default();
    for message in rx {
        match message {
            PoolMessage::Command { command: AudioCommand::Process { track, packet }, worker } => {
                let mut out = Vec::with_capacity(1);
                let processor = match tracks.entry(track) {
                    Entry::Occupied(entry) => Some(entry.into_mut()),
                    Entry::Vacant(entry) => match TrackProcessor::new(config) {
                        Ok(processor) => Some(entry.insert(processor)),
                        Err(e) => {
                            warn!(error = %e, "cannot create an audio pipeline");
                            None
                        }
                    },
                };
                if let Some(processor) = processor {
                    processor.process(Instant::now, track, &packet, &mut out, &mut totals);
                }
                // Answered even when empty: the core counts what it handed out.
                if let Some(tx) = results.get(worker) {
                    let _ = tx.send((track, out));
                }
            }
            PoolMessage::Command { command: AudioCommand::Suppress { track, on }, .. } => {
                if let Some(processor) = tracks.get_mut(&track) {
                    processor.set_suppression(on);
                }
            }
            PoolMessage::Command { command: AudioCommand::Close { track }, .. } => {
                if let Some(processor) = tracks.remove(&track) {
                    totals.add_counters(processor.meters());
                    debug!(publisher = %track.publisher, "audio pipeline closed");
                }
            }
            PoolMessage::Meters(reply) => {
                let _ = reply.send(tracks.iter().map(|(k, p)| (*k, *p.meters())).collect());
            }
            PoolMessage::Totals(reply) => {
                let mut now = totals.clone();
                for processor in tracks.values() {
                    now.add_counters(processor.meters());
                    now.tracks += 1;
                    now.suppressed += usize::from(processor.suppressing());
                }
                let _ = reply.send(now);
            }
        }
    }
}
