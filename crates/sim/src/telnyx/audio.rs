//! What a simulated recording sounds like: exactly the bytes a test gave,
//! or a deterministic WAV made on demand from any offset.

use super::*;

/// Audio content of a simulated recording.
#[derive(Clone, PartialEq, Eq)]
pub enum SimAudio {
    /// Exactly these bytes.
    Bytes(Bytes),
    /// `len` deterministic bytes: a 44-byte WAV header (8 kHz, 16-bit mono
    /// PCM) for that length, then a 440 Hz tone with seeded noise. Produced
    /// on demand from any offset, so a 200 MB recording never sits in memory.
    Generated { len: u64, seed: u64 },
}

impl fmt::Debug for SimAudio {
    // Derived Debug would dump megabytes of audio into a failing assertion.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bytes(b) => write!(f, "SimAudio::Bytes({} bytes)", b.len()),
            Self::Generated { len, seed } => {
                write!(f, "SimAudio::Generated {{ len: {len}, seed: {seed} }}")
            }
        }
    }
}

pub(super) const WAV_HEADER_LEN: u64 = 44;
pub(super) const SAMPLE_RATE: u32 = 8000;
/// 8000 Hz / 440 Hz repeats exactly every 200 samples.
const TONE_PERIOD: usize = 200;
const CHUNK: usize = 64 * 1024;

fn tone_table() -> &'static [i16; TONE_PERIOD] {
    static TABLE: OnceLock<[i16; TONE_PERIOD]> = OnceLock::new();
    TABLE.get_or_init(|| {
        std::array::from_fn(|k| {
            let phase = 2.0 * std::f64::consts::PI * 440.0 * k as f64 / f64::from(SAMPLE_RATE);
            (6000.0 * phase.sin()) as i16
        })
    })
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn sample(table: &[i16; TONE_PERIOD], seed: u64, k: u64) -> [u8; 2] {
    let tone = i32::from(table[(k % TONE_PERIOD as u64) as usize]);
    let noise = (splitmix64(seed ^ k.wrapping_mul(0xD6E8_FEB8_6659_FD93)) >> 53) as i32 - 1024;
    // |tone| <= 6000 and |noise| <= 1024, so this always fits in i16.
    ((tone + noise) as i16).to_le_bytes()
}

impl SimAudio {
    /// Deterministic generated audio of `len` bytes.
    pub fn generated(len: u64, seed: u64) -> Self {
        Self::Generated { len, seed }
    }

    pub fn len(&self) -> u64 {
        match self {
            Self::Bytes(b) => b.len() as u64,
            Self::Generated { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The canonical 44-byte header of a 8 kHz 16-bit mono PCM WAV file of
    /// `total_len` bytes (sizes saturate at 4 GiB, as WAV cannot say more).
    pub fn wav_header(total_len: u64) -> [u8; 44] {
        let riff = u32::try_from(total_len.saturating_sub(8)).unwrap_or(u32::MAX);
        let data = u32::try_from(total_len.saturating_sub(WAV_HEADER_LEN)).unwrap_or(u32::MAX);
        let mut h = [0u8; 44];
        h[0..4].copy_from_slice(b"RIFF");
        h[4..8].copy_from_slice(&riff.to_le_bytes());
        h[8..12].copy_from_slice(b"WAVE");
        h[12..16].copy_from_slice(b"fmt ");
        h[16..20].copy_from_slice(&16u32.to_le_bytes());
        h[20..22].copy_from_slice(&1u16.to_le_bytes()); // PCM
        h[22..24].copy_from_slice(&1u16.to_le_bytes()); // mono
        h[24..28].copy_from_slice(&SAMPLE_RATE.to_le_bytes());
        h[28..32].copy_from_slice(&(SAMPLE_RATE * 2).to_le_bytes()); // byte rate
        h[32..34].copy_from_slice(&2u16.to_le_bytes()); // block align
        h[34..36].copy_from_slice(&16u16.to_le_bytes()); // bits per sample
        h[36..40].copy_from_slice(b"data");
        h[40..44].copy_from_slice(&data.to_le_bytes());
        h
    }

    /// Fills `buf` with the content starting at `offset`. Bytes past the end
    /// are left untouched; callers stay within [`len`](Self::len).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) {
        match self {
            Self::Bytes(b) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX).min(b.len());
                let n = buf.len().min(b.len() - start);
                buf[..n].copy_from_slice(&b[start..start + n]);
            }
            Self::Generated { len, seed } => fill_generated(*len, *seed, offset, buf),
        }
    }

    /// The whole content in memory; for small recordings in tests.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; usize::try_from(self.len()).unwrap_or(usize::MAX)];
        self.read_at(0, &mut v);
        v
    }

    /// SHA-256 of the content, hex, computed in chunks.
    pub fn sha256_hex(&self) -> String {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut offset = 0;
        while offset < self.len() {
            let n =
                usize::try_from((self.len() - offset).min(buf.len() as u64)).unwrap_or(buf.len());
            self.read_at(offset, &mut buf[..n]);
            hasher.update(&buf[..n]);
            offset += n as u64;
        }
        hex::encode(hasher.finalize())
    }

    /// The whole content as a stream of 64 KiB chunks (e.g. for
    /// `reqwest::Body::wrap_stream`).
    pub fn stream(&self) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        self.stream_range(0, self.len())
    }

    /// Bytes `start..end` (end exclusive, clamped to the length) as a stream.
    pub fn stream_range(
        &self,
        start: u64,
        end: u64,
    ) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
        let audio = self.clone();
        let end = end.min(audio.len());
        futures_util::stream::unfold(start, move |pos| {
            let audio = audio.clone();
            async move {
                if pos >= end {
                    return None;
                }
                let n = usize::try_from((end - pos).min(CHUNK as u64)).unwrap_or(CHUNK);
                let chunk = match &audio {
                    Self::Bytes(b) => {
                        let p = usize::try_from(pos).unwrap_or(usize::MAX).min(b.len());
                        b.slice(p..(p + n).min(b.len()))
                    }
                    Self::Generated { .. } => {
                        let mut buf = vec![0u8; n];
                        audio.read_at(pos, &mut buf);
                        Bytes::from(buf)
                    }
                };
                Some((Ok(chunk), pos + n as u64))
            }
        })
    }
}

pub(super) fn fill_generated(len: u64, seed: u64, offset: u64, buf: &mut [u8]) {
    let avail = usize::try_from(len.saturating_sub(offset)).unwrap_or(usize::MAX);
    let buf_len = buf.len().min(avail);
    let buf = &mut buf[..buf_len];
    let mut i = 0;
    let mut pos = offset;
    if pos < WAV_HEADER_LEN {
        let header = SimAudio::wav_header(len);
        while i < buf.len() && pos < WAV_HEADER_LEN {
            buf[i] = header[pos as usize];
            i += 1;
            pos += 1;
        }
    }
    let table = tone_table();
    // Samples are two bytes; a range may start on the second one.
    if i < buf.len() && (pos - WAV_HEADER_LEN) % 2 == 1 {
        buf[i] = sample(table, seed, (pos - WAV_HEADER_LEN) / 2)[1];
        i += 1;
        pos += 1;
    }
    while i + 1 < buf.len() {
        let s = sample(table, seed, (pos - WAV_HEADER_LEN) / 2);
        buf[i] = s[0];
        buf[i + 1] = s[1];
        i += 2;
        pos += 2;
    }
    if i < buf.len() {
        buf[i] = sample(table, seed, (pos - WAV_HEADER_LEN) / 2)[0];
    }
}
