//! Whether a stored WAV file is whole by its own header: the RIFF size and
//! the data chunk's size must agree with the bytes stored. A cut download
//! (a host that closed early, with no length to betray it) keeps a header
//! that declares more than arrived. A pure function over the first bytes
//! and the total, so the store step needs only the start of the stream.

/// How much of the start of a file is kept for [`check`]: a canonical
/// header is 44 bytes; this leaves room for `LIST`/`fact`/`bext` chunks in
/// front of `data`.
pub(crate) const HEAD_LEN: usize = 4096;

/// `Ok` when the header's sizes agree with `total` bytes; otherwise what
/// disagrees. `head` is the first bytes of the file (up to [`HEAD_LEN`]).
pub(crate) fn check(head: &[u8], total: u64) -> Result<(), String> {
    if head.len() < 12 || &head[0..4] != b"RIFF" || &head[8..12] != b"WAVE" {
        return Err("not a RIFF/WAVE file".to_owned());
    }
    let riff = u64::from(u32_at(head, 4));
    // Writers that stream a file put 0 or 0xFFFFFFFF there and never come
    // back: no size is declared, so nothing is proven.
    if riff == 0 || riff == u64::from(u32::MAX) {
        return Err(format!("the RIFF size is a placeholder ({riff:#x})"));
    }
    if riff + 8 != total {
        return Err(format!(
            "the RIFF header declares {} bytes, {total} were stored",
            riff + 8
        ));
    }
    let mut pos: u64 = 12;
    loop {
        let at = usize::try_from(pos).unwrap_or(usize::MAX);
        if at.saturating_add(8) > head.len() {
            return Err(if pos + 8 > total {
                "the file ends before its data chunk".to_owned()
            } else {
                format!("no data chunk in the first {} bytes", head.len())
            });
        }
        let id = &head[at..at + 4];
        let size = u64::from(u32_at(head, at + 4));
        let end = pos + 8 + size;
        if id == b"data" {
            if size == 0 || size == u64::from(u32::MAX) {
                return Err(format!("the data size is a placeholder ({size:#x})"));
            }
            if end > total {
                return Err(format!(
                    "the data chunk declares {size} bytes of audio, {} were stored",
                    total - (pos + 8)
                ));
            }
            // The RIFF size covers the whole file, so whatever follows the
            // audio (a pad byte, a LIST chunk) is accounted for; it must at
            // least be that.
            let after = total - end;
            if after != 0 && after != (size & 1) && after < 8 {
                return Err(format!(
                    "{after} stray bytes after the data chunk, too few for another chunk"
                ));
            }
            return Ok(());
        }
        // Chunks are padded to an even length.
        let next = end + (size & 1);
        if next > total {
            return Err(format!(
                "chunk {:?} runs {} bytes past the end of the file",
                String::from_utf8_lossy(id),
                next - total
            ));
        }
        pos = next;
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(id: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut c = id.to_vec();
        c.extend_from_slice(&u32::try_from(body.len()).unwrap().to_le_bytes());
        c.extend_from_slice(body);
        if body.len() % 2 == 1 {
            c.push(0);
        }
        c
    }

    fn fmt_pcm() -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&1u16.to_le_bytes()); // PCM
        f.extend_from_slice(&1u16.to_le_bytes()); // mono
        f.extend_from_slice(&8000u32.to_le_bytes());
        f.extend_from_slice(&16000u32.to_le_bytes());
        f.extend_from_slice(&2u16.to_le_bytes());
        f.extend_from_slice(&16u16.to_le_bytes());
        chunk(b"fmt ", &f)
    }

    /// WAVE_FORMAT_EXTENSIBLE: a 40-byte fmt chunk.
    fn fmt_extensible() -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&0xFFFEu16.to_le_bytes());
        f.extend_from_slice(&2u16.to_le_bytes());
        f.extend_from_slice(&8000u32.to_le_bytes());
        f.extend_from_slice(&32000u32.to_le_bytes());
        f.extend_from_slice(&4u16.to_le_bytes());
        f.extend_from_slice(&16u16.to_le_bytes());
        f.extend_from_slice(&22u16.to_le_bytes()); // cbSize
        f.extend_from_slice(&16u16.to_le_bytes()); // valid bits
        f.extend_from_slice(&3u32.to_le_bytes()); // channel mask
        f.extend_from_slice(&[
            0x01, 0, 0, 0, 0, 0, 0x10, 0, 0x80, 0, 0, 0xAA, 0, 0x38, 0x9B, 0x71,
        ]);
        chunk(b"fmt ", &f)
    }

    fn riff(chunks: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = chunks.concat();
        let mut w = b"RIFF".to_vec();
        w.extend_from_slice(&u32::try_from(body.len() + 4).unwrap().to_le_bytes());
        w.extend_from_slice(b"WAVE");
        w.extend_from_slice(&body);
        w
    }

    fn checked(file: &[u8]) -> Result<(), String> {
        check(&file[..file.len().min(HEAD_LEN)], file.len() as u64)
    }

    #[test]
    fn whole_files_pass_whatever_their_chunks() {
        let audio = vec![7u8; 1000];
        let list = chunk(b"LIST", b"INFOISFT\x05\x00\x00\x00sim\x00\x00");
        let cases = [
            ("canonical", riff(&[fmt_pcm(), chunk(b"data", &audio)])),
            (
                "extensible fmt",
                riff(&[fmt_extensible(), chunk(b"data", &audio)]),
            ),
            (
                "LIST first",
                riff(&[list.clone(), fmt_pcm(), chunk(b"data", &audio)]),
            ),
            (
                "LIST after the audio",
                riff(&[fmt_pcm(), chunk(b"data", &audio), list.clone()]),
            ),
            (
                "odd-sized audio, padded",
                riff(&[fmt_pcm(), chunk(b"data", &audio[..999])]),
            ),
        ];
        for (name, file) in cases {
            assert_eq!(checked(&file), Ok(()), "{name}");
        }
    }

    #[test]
    fn cut_or_inconsistent_files_fail_and_say_why() {
        let audio = vec![7u8; 1000];
        let whole = riff(&[fmt_pcm(), chunk(b"data", &audio)]);
        let mut wrong_data = whole.clone();
        wrong_data[40..44].copy_from_slice(&2000u32.to_le_bytes());
        wrong_data[4..8].copy_from_slice(&(u32::try_from(whole.len()).unwrap() - 8).to_le_bytes());
        let mut streamed = whole.clone();
        streamed[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        let cases: [(&str, &[u8], u64, &str); 7] = [
            (
                "cut in the audio",
                &whole[..500],
                500,
                "declares 1044 bytes, 500 were stored",
            ),
            ("cut in the header", &whole[..30], 30, "declares 1044 bytes"),
            (
                "data larger than the file",
                &wrong_data,
                wrong_data.len() as u64,
                "data chunk declares 2000",
            ),
            (
                "placeholder sizes",
                &streamed,
                streamed.len() as u64,
                "placeholder",
            ),
            (
                "not a WAV",
                b"ID3\x04\x00\x00\x00\x00\x00\x00\x00\x00",
                12,
                "not a RIFF/WAVE",
            ),
            ("empty", b"", 0, "not a RIFF/WAVE"),
            (
                "longer than declared",
                &whole,
                whole.len() as u64 + 10,
                "1054 were stored",
            ),
        ];
        for (name, head, total, says) in cases {
            let err = check(head, total).expect_err(name);
            assert!(err.contains(says), "{name}: {err}");
        }
    }

    #[test]
    fn a_data_chunk_beyond_the_kept_head_is_not_taken_on_trust() {
        let big_list = chunk(b"LIST", &vec![0u8; HEAD_LEN]);
        let file = riff(&[big_list, fmt_pcm(), chunk(b"data", &[1, 2])]);
        let err = checked(&file).unwrap_err();
        assert!(err.contains("no data chunk in the first"), "{err}");
    }
}
