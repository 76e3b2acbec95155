//! A minimal streaming tar writer (ustar headers, PAX records for long names).
//!
//! Enough to hand Docker a root filesystem: directories, regular files and symlinks. File bodies
//! are copied from a reader, so a large directory tree is never held in memory.

use std::io::{self, Read, Write};

const BLOCK: usize = 512;

/// Ownership, permissions and time of one archive entry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meta {
    pub(crate) mode: u32,
    pub(crate) uid: u64,
    pub(crate) gid: u64,
    pub(crate) mtime: u64,
}

impl Meta {
    /// Root-owned entry with the given permission bits and time 0.
    pub(crate) fn root(mode: u32) -> Self {
        Self {
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
        }
    }
}

/// Writes a tar stream to `W`. Call [`TarWriter::finish`] to write the end-of-archive marker.
pub(crate) struct TarWriter<W: Write> {
    out: W,
}

impl<W: Write> TarWriter<W> {
    /// Starts an archive on `out`.
    pub(crate) fn new(out: W) -> Self {
        Self { out }
    }

    /// Adds a directory entry (`path` without a trailing slash is fine).
    pub(crate) fn dir(&mut self, path: &str, meta: Meta) -> io::Result<()> {
        let mut p = path.trim_end_matches('/').to_string();
        p.push('/');
        self.header(&p, b'5', meta, 0, "")
    }

    /// Adds a symbolic link `path -> target`.
    pub(crate) fn symlink(&mut self, path: &str, target: &str, meta: Meta) -> io::Result<()> {
        self.header(path, b'2', meta, 0, target)
    }

    /// Adds a regular file of exactly `size` bytes read from `body`.
    pub(crate) fn file(
        &mut self,
        path: &str,
        meta: Meta,
        size: u64,
        body: &mut impl Read,
    ) -> io::Result<()> {
        self.header(path, b'0', meta, size, "")?;
        let copied = io::copy(&mut body.take(size), &mut self.out)?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{path}: file shrank while archiving ({copied} of {size} bytes)"),
            ));
        }
        self.pad(size)
    }

    /// Writes the two zero blocks that end an archive and returns the inner writer.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.out.write_all(&[0u8; BLOCK * 2])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn pad(&mut self, size: u64) -> io::Result<()> {
        let rem = (size % BLOCK as u64) as usize;
        if rem != 0 {
            self.out.write_all(&[0u8; BLOCK][..BLOCK - rem])?;
        }
        Ok(())
    }

    fn header(
        &mut self,
        path: &str,
        kind: u8,
        meta: Meta,
        size: u64,
        link: &str,
    ) -> io::Result<()> {
        let path = path.trim_start_matches('/');
        let (name, prefix) = split_name(path);
        let needs_pax = name.is_none() || link.len() > 100 || size > OCTAL_11_MAX;
        if needs_pax {
            let mut records = Vec::new();
            records.extend(pax_record("path", path));
            if !link.is_empty() {
                records.extend(pax_record("linkpath", link));
            }
            if size > OCTAL_11_MAX {
                records.extend(pax_record("size", &size.to_string()));
            }
            let pax_name = format!("PaxHeaders/{}", truncate(path, 80));
            let block = raw_header(
                &pax_name,
                "",
                b'x',
                Meta::root(0o644),
                records.len() as u64,
                "",
            );
            self.out.write_all(&block)?;
            self.out.write_all(&records)?;
            self.pad(records.len() as u64)?;
        }
        let (name, prefix) = match name {
            Some(n) => (n, prefix),
            None => (truncate(path, 100), ""),
        };
        let block = raw_header(
            name,
            prefix,
            kind,
            meta,
            size.min(OCTAL_11_MAX),
            truncate(link, 100),
        );
        self.out.write_all(&block)
    }
}

const OCTAL_11_MAX: u64 = 0o77_777_777_777;

/// Splits a path into ustar `name` (≤100 bytes) and `prefix` (≤155 bytes), if it fits.
fn split_name(path: &str) -> (Option<&str>, &str) {
    if path.len() <= 100 {
        return (Some(path), "");
    }
    for (i, b) in path.bytes().enumerate() {
        let rest = path.len() - i - 1;
        if b == b'/' && i > 0 && i <= 155 && rest > 0 && rest <= 100 {
            return (Some(&path[i + 1..]), &path[..i]);
        }
    }
    (None, "")
}

/// The longest prefix of `s` that is at most `max` bytes and ends on a char boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// One PAX extended-header record: `"<len> <key>=<value>\n"` where len counts itself.
fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    format!("{len} {key}={value}\n").into_bytes()
}

fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    let s = s.as_bytes();
    let start = s.len().saturating_sub(digits);
    field[..digits].copy_from_slice(&s[start..]);
    field[digits] = 0;
}

fn raw_header(
    name: &str,
    prefix: &str,
    kind: u8,
    meta: Meta,
    size: u64,
    link: &str,
) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    h[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h[100..108], u64::from(meta.mode & 0o7777));
    octal(&mut h[108..116], meta.uid.min(0o7_777_777));
    octal(&mut h[116..124], meta.gid.min(0o7_777_777));
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], meta.mtime.min(OCTAL_11_MAX));
    h[148..156].fill(b' ');
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sample() -> Vec<u8> {
        let mut w = TarWriter::new(Vec::new());
        let long_dir = "d".repeat(120);
        let very_long = format!("{}/{}", "x".repeat(200), "y".repeat(150));
        w.dir("bin", Meta::root(0o755)).unwrap();
        w.file(
            "bin/hello",
            Meta::root(0o755),
            5,
            &mut io::Cursor::new(b"hello"),
        )
        .unwrap();
        w.symlink("bin/sh", "hello", Meta::root(0o777)).unwrap();
        w.dir(&long_dir, Meta::root(0o755)).unwrap();
        w.file(
            &format!("{long_dir}/f.txt"),
            Meta {
                mode: 0o600,
                uid: 1000,
                gid: 1000,
                mtime: 1_700_000_000,
            },
            3,
            &mut io::Cursor::new(b"abc"),
        )
        .unwrap();
        w.file(&very_long, Meta::root(0o644), 0, &mut io::empty())
            .unwrap();
        w.symlink("link", &"t".repeat(130), Meta::root(0o777))
            .unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn pax_record_length_counts_itself() {
        let r = pax_record("path", "abc");
        let s = String::from_utf8(r.clone()).unwrap();
        let (len, _) = s.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), r.len());
        let r = pax_record("path", &"a".repeat(95));
        let s = String::from_utf8(r.clone()).unwrap();
        let (len, _) = s.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), r.len());
    }

    #[test]
    fn gnu_tar_reads_the_archive() {
        let dir = tempfile::tempdir().unwrap();
        let tar_path = dir.path().join("t.tar");
        std::fs::write(&tar_path, sample()).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let st = Command::new("tar")
            .arg("-xf")
            .arg(&tar_path)
            .arg("-C")
            .arg(&out)
            .arg("--no-same-owner")
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(std::fs::read(out.join("bin/hello")).unwrap(), b"hello");
        assert_eq!(
            std::fs::read_link(out.join("bin/sh")).unwrap(),
            std::path::Path::new("hello")
        );
        let long_dir = "d".repeat(120);
        assert_eq!(
            std::fs::read(out.join(&long_dir).join("f.txt")).unwrap(),
            b"abc"
        );
        let very_long = format!("{}/{}", "x".repeat(200), "y".repeat(150));
        assert!(out.join(very_long).exists());
        assert_eq!(
            std::fs::read_link(out.join("link")).unwrap(),
            std::path::Path::new(&"t".repeat(130))
        );
        // Listing shows modes and the numeric owner.
        let list = Command::new("tar")
            .arg("-tvf")
            .arg(&tar_path)
            .arg("--numeric-owner")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&list.stdout);
        assert!(text.contains("-rw------- 1000/1000"), "{text}");
        assert!(text.contains("bin/sh -> hello"), "{text}");
    }
}
