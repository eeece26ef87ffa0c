//! Waiting creates: retried after every change that may have made room, answered with
//! `timeout` at their deadline. The caller says what time it is.

use super::backpressure::Parked;
use super::{err, respond_err, Out, Store};
use crate::proto::{ErrorCode, Reply, Response, ServerMessage};
use std::time::{Duration, Instant};

impl Store {
    /// Retries waiting creates after something changed (references released, frames freed).
    pub(super) fn after_change(&mut self, now: Instant, out: &mut Vec<Out>) {
        let names: Vec<String> = self.waiting.iter().cloned().collect();
        for name in names {
            loop {
                let Some(stream) = self.streams.get_mut(&name) else {
                    self.waiting.remove(&name);
                    break;
                };
                let Some(parked) = stream.parked.pop_front() else {
                    self.waiting.remove(&name);
                    break;
                };
                if parked.deadline <= now {
                    self.time_out(&name, parked, out);
                    continue;
                }
                if !self.sessions.contains_key(&parked.session) {
                    continue;
                }
                match self.try_create(parked.session, &name, parked.size, parked.dirty_ok) {
                    Ok(grant) => out.push(Out::Message(
                        parked.session,
                        ServerMessage::Response(Response {
                            id: parked.request,
                            result: Ok(Reply::Granted(grant)),
                        }),
                    )),
                    Err(e) if matches!(e.code, ErrorCode::StreamFull | ErrorCode::RegionFull) => {
                        self.streams
                            .get_mut(&name)
                            .expect("exists")
                            .parked
                            .push_front(parked);
                        break;
                    }
                    Err(e) => {
                        self.stat.errors += 1;
                        out.push(respond_err(parked.session, parked.request, e));
                    }
                }
            }
        }
    }

    fn time_out(&mut self, name: &str, parked: Parked, out: &mut Vec<Out>) {
        self.stat.errors += 1;
        if let Some(stream) = self.streams.get_mut(name) {
            stream.rejected_creates += 1;
        }
        out.push(respond_err(
            parked.session,
            parked.request,
            err(
                ErrorCode::Timeout,
                format!("stream {name:?} stayed full for the whole block timeout"),
            ),
        ));
    }

    /// Answers waiting creates whose deadline has passed (and retries the others).
    pub fn expire(&mut self, now: Instant, out: &mut Vec<Out>) {
        self.after_change(now, out);
        let names: Vec<String> = self.waiting.iter().cloned().collect();
        for name in names {
            let Some(stream) = self.streams.get_mut(&name) else {
                continue;
            };
            let (expired, kept): (Vec<Parked>, Vec<Parked>) =
                stream.parked.drain(..).partition(|p| p.deadline <= now);
            stream.parked = kept.into();
            if stream.parked.is_empty() {
                self.waiting.remove(&name);
            }
            for parked in expired {
                self.time_out(&name, parked, out);
            }
        }
    }

    /// The earliest deadline of a waiting create, `now` being the current time.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        // Creates waiting for region space are retried often: the scrubber frees blocks
        // without telling the store.
        if !self.waiting.is_empty() {
            let soon = now + Duration::from_millis(2);
            return Some(
                self.waiting
                    .iter()
                    .filter_map(|n| self.streams.get(n))
                    .flat_map(|s| s.parked.iter().map(|p| p.deadline))
                    .min()
                    .map_or(soon, |d| d.min(soon)),
            );
        }
        self.waiting
            .iter()
            .filter_map(|n| self.streams.get(n))
            .flat_map(|s| s.parked.iter().map(|p| p.deadline))
            .min()
    }
}
