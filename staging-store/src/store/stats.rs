//! Counters and state for `stat`, `streams`, `streamStat` and metrics.

use super::{BlockCounts, Store};
use crate::proto::{ConsumerStat, StoreStat, StreamStat};

impl Store {
    /// Store-wide state and counters.
    pub fn stat(&self) -> StoreStat {
        // `blocksInUse` is what live objects (and sends still in flight) hold, so that a
        // frame's blocks are seen back exactly when its last reference goes. Two things would
        // blur that: released blocks stay allocated in the region until its background scrubber
        // has zeroed them — wait for it (bounded: this thread queues no release meanwhile) —
        // and the recycled pool keeps freed frames' blocks for `dirtyOk` creates — they are the
        // store's free list, not held by anything, so they do not count.
        self.region.quiesce();
        self.stat_now()
    }

    /// [`Store::stat`] without waiting for the scrubber: `blocks_in_use` may still count
    /// blocks the scrubber is about to take (for metrics, which must not stall the server).
    pub fn stat_now(&self) -> StoreStat {
        let mut stat = self.stat;
        stat.blocks_in_use = self.blocks().held;
        stat.objects = self.objects.len() as u64;
        stat.sessions = self.sessions.len() as u32;
        stat.streams = self.streams.len() as u32;
        stat.recycled_grants = self.recycled.reused;
        stat
    }

    /// Where the region's blocks are now, without waiting for the scrubber (a gauge for
    /// metrics; [`Store::stat`] waits, so its `blocks_in_use` is exact).
    pub fn blocks(&self) -> BlockCounts {
        let block = self.region.block_size();
        let region = self.region.stats();
        let recycled = self.recycled.bytes / block;
        let scrubbing = region.scrub_pending.div_ceil(block);
        BlockCounts {
            allocated: region.blocks_in_use,
            recycled,
            scrubbing,
            held: region
                .blocks_in_use
                .saturating_sub(recycled)
                .saturating_sub(scrubbing),
        }
    }

    /// Every stream's state, sorted by name.
    pub fn stream_stats(&self) -> Vec<StreamStat> {
        let mut names: Vec<&String> = self.streams.keys().collect();
        names.sort();
        names
            .into_iter()
            .filter_map(|n| self.stream_stat(n))
            .collect()
    }

    /// One stream's state.
    pub fn stream_stat(&self, name: &str) -> Option<StreamStat> {
        let s = self.streams.get(name)?;
        let (unconsumed_frames, _) = s.unconsumed();
        let mut consumers: Vec<ConsumerStat> = s
            .consumers
            .iter()
            .map(|(name, c)| ConsumerStat {
                name: name.clone(),
                durable: c.durable,
                attached: c.attached.is_some(),
                committed: c.committed,
                outstanding: c
                    .attached
                    .and_then(|(sid, sub)| {
                        self.sessions
                            .get(&sid)?
                            .subscriptions
                            .get(&sub)
                            .map(|s| s.outstanding)
                    })
                    .unwrap_or(0),
            })
            .collect();
        consumers.sort_by(|a, b| a.name.cmp(&b.name));
        Some(StreamStat {
            name: name.to_owned(),
            config: s.config,
            first_seq: s.first_seq(),
            next_seq: s.next_seq,
            frames: s.frames.len() as u32,
            bytes: s.frames.iter().map(|f| f.bytes).sum(),
            unconsumed_frames,
            writing: s.writing,
            consumers,
            sealed_total: s.sealed_total,
            dropped_total: s.dropped_total,
            blocked_creates: s.blocked_creates,
            rejected_creates: s.rejected_creates,
            ended: s.ended,
            id: crate::proto::stream_id(name),
        })
    }
}
