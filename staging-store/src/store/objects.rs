//! An object's life: granted and written (in place, or by tcp PUTs), sealed into its stream
//! or aborted, and freed with its last reference.

use super::recycled::Freed;
use super::{err, respond_err, unix_nanos, Out, SessionId, Store};
use crate::journal::{self, Record};
use crate::proto::{Body, ErrorCode, PreviousFrame, Reply, Response, ServerMessage, StoreError};
use capnp_rdma::reader::SegmentTable;
use capnp_rdma::BlockLease;
use std::sync::Arc;
use std::time::SystemTime;

#[derive(Debug)]
pub(super) enum State {
    Writing {
        session: SessionId,
        /// Bytes from the grant's start known to be written (tcp: landed on the data
        /// connection; shm: the whole grant, the client writes in place).
        landed_end: u64,
        /// A data-connection write into the grant is in progress (tcp).
        putting: bool,
        /// A seal that arrived before its bytes (tcp).
        pending_seal: Option<(u64, Body)>,
    },
    Sealed {
        seq: u64,
        offset: u64,
        len: u64,
        checksum: Option<u32>,
        sealed_nanos: u64,
    },
}

#[derive(Debug)]
pub(super) struct Object {
    pub(super) lease: Arc<BlockLease>,
    pub(super) stream: String,
    pub(super) state: State,
    pub(super) refs: u32,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Frame {
    pub(super) seq: u64,
    pub(super) object: u64,
    pub(super) bytes: u64,
}

/// The frame a seal names: `len` bytes at region offset `offset`, the CRC-32C its writer
/// gave, and the references released with it.
#[derive(Clone, Debug)]
struct SealedBytes {
    offset: u64,
    len: u64,
    checksum: Option<u32>,
    releases: Vec<u64>,
}

impl Store {
    pub(super) fn seal(
        &mut self,
        session: SessionId,
        request: u64,
        body: Body,
        wall: SystemTime,
        out: &mut Vec<Out>,
    ) -> Result<Option<Reply>, StoreError> {
        let Body::Seal {
            object,
            offset,
            len,
            checksum,
            ref releases,
        } = body
        else {
            unreachable!("dispatch passes seals only")
        };
        self.check_releases(session, releases)?;
        let obj = self.owned_writing(session, object)?;
        let lease_offset = obj.lease.offset();
        let lease_len = obj.lease.len();
        if offset < lease_offset
            || len < 8
            || offset
                .checked_add(len)
                .is_none_or(|end| end > lease_offset + lease_len)
        {
            return Err(err(
                ErrorCode::OutOfGrant,
                format!(
                    "seal of {len} bytes at {offset}: the grant is {lease_len} bytes at {lease_offset}"
                ),
            ));
        }
        if let State::Writing {
            landed_end,
            pending_seal,
            putting,
            ..
        } = &mut obj.state
        {
            if *putting || offset + len > lease_offset + *landed_end {
                // A tcp seal that overtook its bytes: answered when they land.
                if pending_seal.is_some() {
                    return Err(err(
                        ErrorCode::BadRequest,
                        "object already has a seal pending",
                    ));
                }
                *pending_seal = Some((request, body));
                return Ok(None);
            }
        }
        let sealed = SealedBytes {
            offset,
            len,
            checksum,
            releases: releases.clone(),
        };
        self.finish_seal(session, object, sealed, wall, out)
            .map(|seq| Some(Reply::Sealed(seq)))
    }

    /// Every reference is this session's and named once: a seal or commit that releases
    /// them fails whole before anything happens otherwise.
    pub(super) fn check_releases(
        &self,
        session: SessionId,
        references: &[u64],
    ) -> Result<(), StoreError> {
        let held = &self.sessions.get(&session).expect("live session").held;
        for (i, reference) in references.iter().enumerate() {
            if !held.contains_key(reference) || references[..i].contains(reference) {
                return Err(err(
                    ErrorCode::UnknownReference,
                    format!(
                        "reference {reference} is not this client's to release (or named twice)"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn owned_writing(
        &mut self,
        session: SessionId,
        object: u64,
    ) -> Result<&mut Object, StoreError> {
        match self.objects.get_mut(&object) {
            Some(o) => match &o.state {
                State::Writing { session: owner, .. } if *owner == session => Ok(o),
                State::Writing { .. } => Err(err(
                    ErrorCode::UnknownObject,
                    format!("object {object} is not this client's"),
                )),
                State::Sealed { .. } => Err(err(
                    ErrorCode::NotWritable,
                    format!("object {object} is already sealed"),
                )),
            },
            None => Err(err(
                ErrorCode::UnknownObject,
                format!("no object {object} (never granted, aborted, or freed)"),
            )),
        }
    }

    fn finish_seal(
        &mut self,
        session: SessionId,
        object: u64,
        sealed: SealedBytes,
        wall: SystemTime,
        out: &mut Vec<Out>,
    ) -> Result<u64, StoreError> {
        let SealedBytes {
            offset,
            len,
            checksum,
            releases,
        } = sealed;
        let obj = self.objects.get(&object).expect("checked by the caller");
        let stream_name = obj.stream.clone();
        let Some(stream) = self.streams.get(&stream_name) else {
            return Err(err(
                ErrorCode::UnknownStream,
                format!("stream {stream_name:?} was deleted"),
            ));
        };
        if stream.ended {
            return Err(err(
                ErrorCode::EndOfStream,
                format!("stream {stream_name:?} has ended: no frame follows its last"),
            ));
        }
        // Checked again: a tcp seal waits for its bytes, and a release may have come meanwhile.
        self.check_releases(session, &releases)?;
        // SAFETY: the range lies in the object's grant (checked by `seal`), whose blocks this
        // store owns; its writer has asked to seal, so it no longer writes them (a client that
        // still did would only corrupt its own frame, which the framing and checksum checks
        // and the consumers' bounds-checked reader then see).
        let bytes = unsafe { self.region.bytes(offset, len) }
            .map_err(|e| err(ErrorCode::OutOfGrant, e.to_string()))?;
        match SegmentTable::parse(bytes, 512) {
            Ok(table) if table.message_bytes() == len => {}
            Ok(table) => {
                return Err(err(
                    ErrorCode::BadFrame,
                    format!(
                        "the segment table describes {} bytes, the seal {len}",
                        table.message_bytes()
                    ),
                ))
            }
            Err(e) => return Err(err(ErrorCode::BadFrame, e.to_string())),
        }
        if checksum.is_none() && (stream.config.checksums || self.options.checksums_required) {
            return Err(err(
                ErrorCode::ChecksumRequired,
                "this stream (or store) needs a CRC-32C with every seal",
            ));
        }
        if let (Some(expected), true) = (checksum, self.options.verify_checksums) {
            let actual = journal::frame_crc(bytes);
            if actual != expected {
                return Err(err(
                    ErrorCode::ChecksumMismatch,
                    format!("seal says CRC-32C {expected:#010x}, the bytes have {actual:#010x}"),
                ));
            }
        }
        let seq = stream.next_seq;
        let sealed_nanos = unix_nanos(wall);
        let with_releases = !releases.is_empty();
        let apply = |store: &mut Store| {
            let lease = &store.objects[&object].lease;
            store.journal(Record::Sealed {
                stream: stream_name.clone(),
                seq,
                lease_offset: lease.offset(),
                lease_len: lease.len(),
                data_offset: offset,
                data_len: len,
                crc32c: checksum.unwrap_or(0),
                unix_nanos: sealed_nanos,
            })?;
            let obj = store.objects.get_mut(&object).expect("exists");
            obj.state = State::Sealed {
                seq,
                offset,
                len,
                checksum,
                sealed_nanos,
            };
            let bytes = obj.lease.len();
            if let Some(s) = store.sessions.get_mut(&session) {
                s.writing.retain(|&o| o != object);
            }
            let stream = store.streams.get_mut(&stream_name).expect("exists");
            stream.writing -= 1;
            stream.writing_bytes -= bytes;
            stream.next_seq += 1;
            stream.sealed_total += 1;
            stream.frames.push_back(Frame { seq, object, bytes });
            store.stat.seals += 1;
            store.pump(&stream_name, out);
            store.trim(&stream_name);
            // The input frames this output was made from, in the same operation.
            for reference in releases {
                store
                    .release(session, reference, true, out)
                    .expect("checked before the seal");
            }
            Ok(seq)
        };
        if with_releases {
            // The seal and the releases reach the journal as one record.
            self.grouped(apply)
        } else {
            // A plain seal keeps its record ahead of any change: a failed append seals nothing.
            apply(self)
        }
    }

    /// Starts a tcp session's write of `len` bytes at `at` (from the grant's start) of
    /// `object`: checked against the grant before a byte is read. Returns the region offset to
    /// write at and the lease to hold while writing. A seal waits until [`Store::end_put`].
    pub fn begin_put(
        &mut self,
        session: SessionId,
        object: u64,
        at: u64,
        len: u64,
    ) -> Result<(u64, Arc<BlockLease>), StoreError> {
        let obj = self
            .objects
            .get_mut(&object)
            .ok_or_else(|| err(ErrorCode::UnknownObject, format!("no object {object}")))?;
        let grant = obj.lease.len();
        match &mut obj.state {
            State::Writing {
                session: owner,
                putting,
                landed_end,
                ..
            } if *owner == session => {
                if at.checked_add(len).is_none_or(|end| end > grant) {
                    return Err(err(
                        ErrorCode::OutOfGrant,
                        format!("write of {len} bytes at {at}: the grant is {grant} bytes"),
                    ));
                }
                // Writes fill the grant from its start without gaps, so everything below
                // `landed_end` was written by this client: a grant of reused blocks never
                // seals a stale byte.
                if at > *landed_end {
                    return Err(err(
                        ErrorCode::OutOfGrant,
                        format!(
                            "write at {at}: writes fill a grant from its start without gaps, \
                             and the bytes written so far end at {landed_end}"
                        ),
                    ));
                }
                *putting = true;
            }
            State::Writing { .. } => {
                return Err(err(ErrorCode::UnknownObject, "not this client's object"))
            }
            State::Sealed { .. } => {
                return Err(err(ErrorCode::NotWritable, "object already sealed"))
            }
        }
        Ok((obj.lease.offset() + at, Arc::clone(&obj.lease)))
    }

    /// Ends a write begun with [`Store::begin_put`]: `landed` is the end (from the grant's
    /// start) of the bytes it wrote, `None` if it failed. Answers a seal that was waiting
    /// (stamped with `wall`, the time of day).
    pub fn end_put(
        &mut self,
        session: SessionId,
        object: u64,
        landed: Option<u64>,
        wall: SystemTime,
        out: &mut Vec<Out>,
    ) {
        let Some(obj) = self.objects.get_mut(&object) else {
            return;
        };
        let lease_offset = obj.lease.offset();
        let State::Writing {
            session: owner,
            landed_end,
            putting,
            pending_seal,
        } = &mut obj.state
        else {
            return;
        };
        if *owner != session {
            return;
        }
        *putting = false;
        if let Some(end) = landed {
            *landed_end = (*landed_end).max(end);
        }
        let ready = matches!(pending_seal, Some((_, Body::Seal { offset, len, .. }))
            if *offset + *len <= lease_offset + *landed_end);
        if !ready {
            return;
        }
        let Some((
            request,
            Body::Seal {
                offset,
                len,
                checksum,
                releases,
                ..
            },
        )) = pending_seal.take()
        else {
            return;
        };
        let result = self
            .finish_seal(
                session,
                object,
                SealedBytes {
                    offset,
                    len,
                    checksum,
                    releases,
                },
                wall,
                out,
            )
            .map(Reply::Sealed);
        if result.is_err() {
            self.stat.errors += 1;
        }
        out.push(Out::Message(
            session,
            ServerMessage::Response(Response {
                id: request,
                result,
            }),
        ));
    }

    /// A tcp session's data connection failed: seals waiting for bytes fail.
    pub fn data_failed(&mut self, session: SessionId, why: &str, out: &mut Vec<Out>) {
        let Some(s) = self.sessions.get(&session) else {
            return;
        };
        for object in s.writing.clone() {
            if let Some(Object {
                state: State::Writing { pending_seal, .. },
                ..
            }) = self.objects.get_mut(&object)
            {
                if let Some((request, _)) = pending_seal.take() {
                    self.stat.errors += 1;
                    out.push(respond_err(
                        session,
                        request,
                        err(ErrorCode::DataNotLanded, format!("data connection: {why}")),
                    ));
                }
            }
        }
    }

    pub(super) fn abort(
        &mut self,
        session: SessionId,
        object: u64,
        out: &mut Vec<Out>,
    ) -> Result<Reply, StoreError> {
        self.owned_writing(session, object)?;
        self.drop_writing(session, object, out);
        Ok(Reply::Ok)
    }

    pub(super) fn drop_writing(&mut self, session: SessionId, object: u64, out: &mut Vec<Out>) {
        let Some(obj) = self.objects.get_mut(&object) else {
            return;
        };
        if let State::Writing { pending_seal, .. } = &mut obj.state {
            if let Some((request, _)) = pending_seal.take() {
                self.stat.errors += 1;
                out.push(respond_err(
                    session,
                    request,
                    err(ErrorCode::NotWritable, "aborted"),
                ));
            }
        }
        let obj = &self.objects[&object];
        let (stream_name, bytes) = (obj.stream.clone(), obj.lease.len());
        if let Some(stream) = self.streams.get_mut(&stream_name) {
            stream.writing -= 1;
            stream.writing_bytes -= bytes;
        }
        if let Some(s) = self.sessions.get_mut(&session) {
            s.writing.retain(|&o| o != object);
        }
        self.stat.aborted_writes += 1;
        self.unref(object);
    }

    /// Drops one reference of `object`; the last one frees its blocks. (A frame's `Freed`
    /// record was appended when it left its stream, before this can happen.)
    pub(super) fn unref(&mut self, object: u64) {
        let Some(obj) = self.objects.get_mut(&object) else {
            return;
        };
        obj.refs -= 1;
        if obj.refs > 0 {
            return;
        }
        // The lease goes; a server task still sending the bytes holds its own clone. Blocks of
        // a frame nobody else holds are kept for the next `dirtyOk` create of that size.
        let obj = self.objects.remove(&object).expect("present");
        if let (
            Ok(lease),
            State::Sealed {
                seq, offset, len, ..
            },
        ) = (Arc::try_unwrap(obj.lease), obj.state)
        {
            let freed = Freed {
                stream: obj.stream,
                frame: PreviousFrame { seq, offset, len },
            };
            self.recycled.put(lease, freed, self.region.len() / 4);
        }
    }
}
