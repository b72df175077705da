//! The part of a job's masked log the coordinator keeps in memory.
//!
//! A job's log is sent to GitLab in order and, once GitLab confirms holding
//! a prefix, that prefix is only needed again if GitLab asks for it again
//! (a 416 naming a shorter size, a 412 asking for the whole trace). The
//! trace journal on disk holds the whole log, so the window keeps only the
//! newest unconfirmed bytes, up to a cap: a coordinator streaming a thousand
//! jobs holds a bounded tail of each, and a job that writes faster than
//! GitLab takes its log (or while GitLab is away) is sent from the journal,
//! as gitlab-runner sends it from its trace file. Length and checksum are
//! kept over every byte ever appended, so the final update never needs the
//! whole log either. Without a journal there is nowhere to read dropped
//! bytes back from, so nothing is dropped.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use super::client::TraceOutput;

/// Why bytes cannot be served from the window: they were dropped (confirmed,
/// or pushed out by newer bytes) and must be read from the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dropped {
    /// The first byte the window still holds.
    pub(crate) kept_from: u64,
}

/// A masked log's length and checksum, and its newest unconfirmed bytes.
#[derive(Debug)]
pub(crate) struct LogWindow {
    /// Log bytes from `base` to `len`, in order; no chunk is empty.
    chunks: VecDeque<Bytes>,
    /// Offset in the log of the first byte of `chunks`.
    base: u64,
    /// Bytes appended in all.
    len: u64,
    /// Checksum of every byte appended.
    crc: crc32fast::Hasher,
    /// Most bytes kept; `None` keeps every byte (nowhere to re-read them).
    cap: Option<u64>,
}

impl LogWindow {
    /// A window over a log that starts with `start` (a resumed job's log),
    /// keeping at most `cap` bytes, or all of them.
    pub(crate) fn new(start: Vec<u8>, cap: Option<u64>) -> Self {
        let mut window = Self {
            chunks: VecDeque::new(),
            base: 0,
            len: 0,
            crc: crc32fast::Hasher::new(),
            cap,
        };
        window.push(Bytes::from(start));
        window
    }

    /// Bytes appended in all.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Bytes held in memory.
    #[cfg(test)]
    pub(crate) fn held(&self) -> u64 {
        self.len - self.base
    }

    /// Appends log bytes; the oldest go if the window is over its cap.
    pub(crate) fn push(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.crc.update(&bytes);
        self.len += bytes.len() as u64;
        self.chunks.push_back(bytes);
        if let Some(cap) = self.cap {
            self.drop_before(self.len.saturating_sub(cap));
        }
    }

    /// Length and checksum of the whole log.
    pub(crate) fn output(&self) -> TraceOutput {
        TraceOutput {
            checksum: self.crc.clone().finalize(),
            bytesize: self.len,
        }
    }

    /// GitLab holds the log up to `upto`: what is before it goes, unless
    /// every byte is kept.
    pub(crate) fn confirm(&mut self, upto: u64) {
        if self.cap.is_some() {
            self.drop_before(upto.min(self.len));
        }
    }

    fn drop_before(&mut self, upto: u64) {
        while let Some(first) = self.chunks.front_mut() {
            let first_len = first.len() as u64;
            if self.base + first_len <= upto {
                self.base += first_len;
                self.chunks.pop_front();
            } else {
                if upto > self.base {
                    let skip = usize::try_from(upto - self.base).unwrap_or(usize::MAX);
                    // Slicing would keep the chunk's allocation until all of
                    // it goes; copying the rest out frees it now.
                    *first = Bytes::copy_from_slice(&first[skip..]);
                    self.base = upto;
                }
                break;
            }
        }
    }

    /// Keeps every byte from now on (the journal they could be re-read
    /// from is gone).
    pub(crate) fn keep_all(&mut self) {
        self.cap = None;
    }

    /// Up to `max` bytes of the log from `from`: empty at the end of the
    /// log.
    ///
    /// # Errors
    /// [`Dropped`] if `from` is before the bytes kept: read those from the
    /// journal.
    pub(crate) fn read(&self, from: u64, max: usize) -> Result<Bytes, Dropped> {
        if from < self.base {
            return Err(Dropped {
                kept_from: self.base,
            });
        }
        let want = usize::try_from((self.len.saturating_sub(from)).min(max as u64)).unwrap_or(max);
        if want == 0 {
            return Ok(Bytes::new());
        }
        let mut skip = usize::try_from(from - self.base).unwrap_or(usize::MAX);
        let mut chunks = self.chunks.iter();
        let first = loop {
            let chunk = chunks.next().expect("from is inside the window");
            if skip < chunk.len() {
                break chunk;
            }
            skip -= chunk.len();
        };
        if first.len() - skip >= want {
            return Ok(first.slice(skip..skip + want));
        }
        let mut out = BytesMut::with_capacity(want);
        out.extend_from_slice(&first[skip..]);
        for chunk in chunks {
            let room = want - out.len();
            if room == 0 {
                break;
            }
            out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        Ok(out.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(parts: &[&[u8]], cap: Option<u64>) -> LogWindow {
        let mut w = LogWindow::new(Vec::new(), cap);
        for part in parts {
            w.push(Bytes::copy_from_slice(part));
        }
        w
    }

    #[test]
    fn reads_across_chunks_and_stops_at_the_end() {
        let w = window(&[b"abc", b"def", b"gh"], Some(100));
        assert_eq!(w.read(0, 100).unwrap(), Bytes::from_static(b"abcdefgh"));
        assert_eq!(w.read(2, 3).unwrap(), Bytes::from_static(b"cde"));
        assert_eq!(w.read(4, 1).unwrap(), Bytes::from_static(b"e"));
        assert_eq!(w.read(7, 10).unwrap(), Bytes::from_static(b"h"));
        assert!(w.read(8, 10).unwrap().is_empty());
        assert!(w.read(20, 10).unwrap().is_empty());
    }

    #[test]
    fn confirmed_bytes_leave_memory_but_not_the_checksum() {
        let mut w = window(&[b"abc", b"def", b"gh"], Some(100));
        w.confirm(4);
        assert_eq!(w.held(), 4);
        assert_eq!(w.read(4, 100).unwrap(), Bytes::from_static(b"efgh"));
        assert_eq!(w.read(3, 100), Err(Dropped { kept_from: 4 }));
        w.confirm(8);
        assert_eq!(w.held(), 0);
        assert_eq!(w.output(), TraceOutput::of(b"abcdefgh"));
        w.push(Bytes::from_static(b"ij"));
        assert_eq!(w.read(8, 100).unwrap(), Bytes::from_static(b"ij"));
        assert_eq!(w.output(), TraceOutput::of(b"abcdefghij"));
    }

    #[test]
    fn the_newest_bytes_stay_within_the_cap() {
        let mut w = window(&[b"abcd", b"efgh", b"ij"], Some(5));
        assert_eq!(w.held(), 5);
        assert_eq!(w.read(5, 100).unwrap(), Bytes::from_static(b"fghij"));
        assert_eq!(w.read(0, 100), Err(Dropped { kept_from: 5 }));
        assert_eq!(w.output(), TraceOutput::of(b"abcdefghij"));
        // One push bigger than the cap keeps its own tail.
        w.push(Bytes::from_static(b"0123456789"));
        assert_eq!(w.read(15, 100).unwrap(), Bytes::from_static(b"56789"));
    }

    #[test]
    fn without_a_journal_nothing_is_dropped() {
        let mut w = window(&[b"abc", b"def"], None);
        w.confirm(6);
        assert_eq!(w.held(), 6);
        assert_eq!(w.read(0, 100).unwrap(), Bytes::from_static(b"abcdef"));
        let mut w = window(&[b"abc", b"def"], Some(4));
        w.confirm(2);
        w.keep_all();
        w.confirm(6);
        w.push(Bytes::from_static(b"ghijkl"));
        assert_eq!(w.read(2, 100).unwrap(), Bytes::from_static(b"cdefghijkl"));
    }

    #[test]
    fn a_resumed_log_counts_from_its_start() {
        let mut w = LogWindow::new(b"before\n".to_vec(), Some(100));
        w.push(Bytes::from_static(b"after\n"));
        assert_eq!(w.output(), TraceOutput::of(b"before\nafter\n"));
        assert_eq!(w.read(7, 100).unwrap(), Bytes::from_static(b"after\n"));
    }
}
