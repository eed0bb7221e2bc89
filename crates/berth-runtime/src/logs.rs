//! A Machine's captured stdout and stderr: `logs/output.log`, plus one rotated file,
//! so disk use stays near twice the cap.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::MachineLayout;

pub const DEFAULT_MAX_BYTES: u64 = 8 * 1024 * 1024;
pub const LOG_FILE: &str = "output.log";
pub const ROTATED_LOG_FILE: &str = "output.log.1";
/// Position of `output.log`'s first byte in the Machine's whole output: the bytes rotated
/// away before it. Lets readers follow the output across rotations.
pub const BASE_FILE: &str = "output.log.base";

/// A partial line longer than this is written out without waiting for its newline.
const MAX_PENDING_LINE: usize = 16 * 1024;

/// Appends to `output.log`, rotating it to `output.log.1` when the next write would pass
/// the cap.
#[derive(Debug)]
pub struct LogWriter {
    dir: PathBuf,
    max_bytes: u64,
    file: File,
    size: u64,
    base: u64,
}

impl LogWriter {
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<LogWriter> {
        fs::create_dir_all(dir)?;
        let file = open_append(&dir.join(LOG_FILE))?;
        let size = file.metadata()?.len();
        Ok(LogWriter {
            dir: dir.to_path_buf(),
            max_bytes: max_bytes.max(1),
            file,
            size,
            base: read_base(dir)?,
        })
    }

    /// Appends `data`, rotating as needed so neither file passes the cap. Data is cut
    /// at line ends where one fits; only a line longer than the cap is split.
    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let room =
                usize::try_from(self.max_bytes.saturating_sub(self.size)).unwrap_or(usize::MAX);
            if data.len() <= room {
                return self.append(data);
            }
            let cut = match data[..room].iter().rposition(|b| *b == b'\n') {
                Some(i) => i + 1,
                None if self.size == 0 => room.max(1),
                None => 0,
            };
            self.append(&data[..cut])?;
            data = &data[cut..];
            self.rotate()?;
        }
        Ok(())
    }

    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all(data)?;
        self.size += data.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let current = self.dir.join(LOG_FILE);
        fs::rename(&current, self.dir.join(ROTATED_LOG_FILE))?;
        self.base += self.size;
        crate::util::write_replace(
            &self.dir.join(BASE_FILE),
            self.base.to_string().as_bytes(),
            false,
        )?;
        self.file = open_append(&current)?;
        self.size = 0;
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Assembles one stream's output into whole lines, so stdout and stderr interleave in
/// the log by line rather than by pipe read.
#[derive(Debug, Default)]
pub struct LineBuffer {
    pending: Vec<u8>,
}

impl LineBuffer {
    pub fn push(&mut self, data: &[u8], out: &mut LogWriter) -> io::Result<()> {
        self.pending.extend_from_slice(data);
        if self.pending.len() > MAX_PENDING_LINE {
            return self.flush(out);
        }
        if let Some(end) = self.pending.iter().rposition(|b| *b == b'\n') {
            let rest = self.pending.split_off(end + 1);
            let whole = std::mem::replace(&mut self.pending, rest);
            out.write(&whole)?;
        }
        Ok(())
    }

    /// Writes out any partial line.
    pub fn flush(&mut self, out: &mut LogWriter) -> io::Result<()> {
        let all = std::mem::take(&mut self.pending);
        out.write(&all)
    }
}

/// The last `max_bytes` of the Machine's output, rotated file first. Missing logs are
/// empty.
pub fn read_logs(layout: &MachineLayout, max_bytes: u64) -> io::Result<Vec<u8>> {
    let dir = layout.log_dir();
    let mut current = read_tail(&dir.join(LOG_FILE), max_bytes)?;
    let left = max_bytes.saturating_sub(current.len() as u64);
    if left == 0 {
        return Ok(current);
    }
    let mut out = read_tail(&dir.join(ROTATED_LOG_FILE), left)?;
    out.append(&mut current);
    Ok(out)
}

fn read_base(dir: &Path) -> io::Result<u64> {
    match fs::read_to_string(dir.join(BASE_FILE)) {
        Ok(text) => Ok(text.trim().parse().unwrap_or(0)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

fn file_len(path: &Path) -> io::Result<u64> {
    match fs::metadata(path) {
        Ok(meta) => Ok(meta.len()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Bytes `start..start + data.len()` of the Machine's whole output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSlice {
    pub start: u64,
    pub data: Vec<u8>,
}

impl LogSlice {
    pub fn next(&self) -> u64 {
        self.start + self.data.len() as u64
    }
}

/// The positions still on disk: `(oldest, end)`.
pub fn log_bounds(layout: &MachineLayout) -> io::Result<(u64, u64)> {
    let dir = layout.log_dir();
    let base = read_base(&dir)?;
    let oldest = base.saturating_sub(file_len(&dir.join(ROTATED_LOG_FILE))?);
    Ok((oldest, base + file_len(&dir.join(LOG_FILE))?))
}

/// Up to `max_bytes` of output from `position` on. A position older than what is kept
/// starts at the oldest byte kept; one past the end reads nothing from the end.
pub fn read_from(layout: &MachineLayout, position: u64, max_bytes: u64) -> io::Result<LogSlice> {
    let dir = layout.log_dir();
    let mut attempt = 0;
    loop {
        let base = read_base(&dir)?;
        let current_len = file_len(&dir.join(LOG_FILE))?;
        let oldest = base.saturating_sub(file_len(&dir.join(ROTATED_LOG_FILE))?);
        let start = position.clamp(oldest, base + current_len);
        let data = if start >= base {
            read_range(&dir.join(LOG_FILE), start - base, max_bytes)?
        } else {
            let wanted = max_bytes.min(base - start);
            read_range(&dir.join(ROTATED_LOG_FILE), start - oldest, wanted)?
        };
        // A rotation in between moved the bytes: read again.
        attempt += 1;
        if read_base(&dir)? == base || attempt >= 3 {
            return Ok(LogSlice { start, data });
        }
    }
}

fn read_range(path: &Path, offset: u64, max_bytes: u64) -> io::Result<Vec<u8>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    file.seek(SeekFrom::Start(offset))?;
    let mut out = Vec::new();
    file.take(max_bytes).read_to_end(&mut out)?;
    Ok(out)
}

fn read_tail(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max_bytes)))?;
    let mut out = Vec::new();
    file.take(max_bytes).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_and_reads_tail() {
        let root = tempfile::tempdir().unwrap();
        let layout = MachineLayout::new(root.path(), "m1");
        let mut w = LogWriter::open(&layout.log_dir(), 100).unwrap();
        let mut lines = LineBuffer::default();
        for i in 0..40 {
            lines
                .push(format!("line {i:03}\n").as_bytes(), &mut w)
                .unwrap();
        }
        // One read holding many lines still respects the cap.
        let burst: String = (40..50).map(|i| format!("line {i:03}\n")).collect();
        lines.push(burst.as_bytes(), &mut w).unwrap();
        let cur = fs::metadata(layout.log_dir().join(LOG_FILE)).unwrap().len();
        let old = fs::metadata(layout.log_dir().join(ROTATED_LOG_FILE))
            .unwrap()
            .len();
        assert!(cur <= 100 && old <= 100, "{cur} {old}");
        let tail = read_logs(&layout, 30).unwrap();
        assert_eq!(tail.len(), 30);
        assert!(tail.ends_with(b"line 049\n"));
        let all = String::from_utf8(read_logs(&layout, 10_000).unwrap()).unwrap();
        assert!(all.ends_with("line 048\nline 049\n"));
        assert!(all.len() as u64 == cur + old);
    }

    #[test]
    fn splits_a_line_longer_than_the_cap() {
        let root = tempfile::tempdir().unwrap();
        let layout = MachineLayout::new(root.path(), "m1");
        let mut w = LogWriter::open(&layout.log_dir(), 10).unwrap();
        w.write(b"ab\n0123456789abcdef\n").unwrap();
        let cur = fs::read(layout.log_dir().join(LOG_FILE)).unwrap();
        let old = fs::read(layout.log_dir().join(ROTATED_LOG_FILE)).unwrap();
        assert_eq!(
            (old.as_slice(), cur.as_slice()),
            (&b"0123456789"[..], &b"abcdef\n"[..])
        );
    }

    #[test]
    fn keeps_lines_whole_across_streams() {
        let root = tempfile::tempdir().unwrap();
        let layout = MachineLayout::new(root.path(), "m1");
        let mut w = LogWriter::open(&layout.log_dir(), DEFAULT_MAX_BYTES).unwrap();
        let (mut out, mut err) = (LineBuffer::default(), LineBuffer::default());
        out.push(b"hel", &mut w).unwrap();
        err.push(b"oops\n", &mut w).unwrap();
        out.push(b"lo\npart", &mut w).unwrap();
        out.flush(&mut w).unwrap();
        assert_eq!(read_logs(&layout, 1000).unwrap(), b"oops\nhello\npart");
    }

    #[test]
    fn positions_continue_across_rotations() {
        let root = tempfile::tempdir().unwrap();
        let layout = MachineLayout::new(root.path(), "m1");
        let mut w = LogWriter::open(&layout.log_dir(), 20).unwrap();
        let mut whole = Vec::new();
        for i in 0..10 {
            let line = format!("line {i}\n");
            w.write(line.as_bytes()).unwrap();
            whole.extend_from_slice(line.as_bytes());
        }
        let (oldest, end) = log_bounds(&layout).unwrap();
        assert_eq!(end, whole.len() as u64);
        assert!(oldest > 0, "the oldest lines were rotated away");
        // Reading from any kept position yields exactly the bytes written there.
        let mut position = oldest;
        let mut read = Vec::new();
        while position < end {
            let slice = read_from(&layout, position, 7).unwrap();
            assert_eq!(slice.start, position);
            assert!(!slice.data.is_empty());
            read.extend_from_slice(&slice.data);
            position = slice.next();
        }
        assert_eq!(read, &whole[oldest as usize..]);
        // Too old starts at the oldest; past the end reads nothing.
        assert_eq!(read_from(&layout, 0, 100).unwrap().start, oldest);
        let past = read_from(&layout, end + 50, 100).unwrap();
        assert_eq!((past.start, past.data.len()), (end, 0));
        // A new writer (the next run's shim) keeps counting.
        let mut again = LogWriter::open(&layout.log_dir(), 20).unwrap();
        again.write(b"next run\n").unwrap();
        let slice = read_from(&layout, end, 100).unwrap();
        assert_eq!(slice.data, b"next run\n");
    }

    #[test]
    fn missing_logs_are_empty() {
        let root = tempfile::tempdir().unwrap();
        let layout = MachineLayout::new(root.path(), "none");
        assert!(read_logs(&layout, 10).unwrap().is_empty());
    }
}
