//! Recordings a person can listen to: the simulator's default audio is a
//! steady tone under noise, which says nothing when played. These mark time
//! instead, so a listener hears where a seek landed:
//!
//! - every second, a short tick (660 Hz);
//! - every ten seconds, a longer chime (880 Hz);
//! - at every full minute, the call's number as that many low pips
//!   (440 Hz), so two calls sound different.

use bytes::Bytes;

use recording_relay_sim::SimAudio;

const RATE: u32 = 8000;

/// `seconds` of 8 kHz 16-bit mono WAV for call number `call` (1-based).
pub fn timed_tones(seconds: u64, call: u32) -> SimAudio {
    let samples = seconds * u64::from(RATE);
    let total = 44 + samples * 2;
    let mut wav = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    wav.extend_from_slice(&SimAudio::wav_header(total));
    for n in 0..samples {
        wav.extend_from_slice(&sample(n, call).to_le_bytes());
    }
    SimAudio::Bytes(Bytes::from(wav))
}

fn sample(n: u64, call: u32) -> i16 {
    let rate = u64::from(RATE);
    let second = n / rate;
    let t = (n % rate) as f64 / f64::from(RATE);
    let (freq, start, len) = if second.is_multiple_of(60) && call > 0 {
        // `call` pips of 120 ms, 80 ms apart.
        let slot = (t / 0.2) as u32;
        if slot >= call.min(5) {
            return 0;
        }
        (440.0, f64::from(slot) * 0.2, 0.12)
    } else if second.is_multiple_of(10) {
        (880.0, 0.0, 0.35)
    } else {
        (660.0, 0.0, 0.08)
    };
    let local = t - start;
    if !(0.0..len).contains(&local) {
        return 0;
    }
    // 5 ms ramps, so the tones do not click.
    let ramp = (local / 0.005).min((len - local) / 0.005).min(1.0);
    let phase = 2.0 * std::f64::consts::PI * freq * local;
    (9000.0 * ramp * phase.sin()) as i16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pcm(audio: &SimAudio) -> Vec<i16> {
        audio.to_vec()[44..]
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]))
            .collect()
    }

    #[test]
    fn tones_are_ticks_and_silence_not_noise() {
        let audio = timed_tones(12, 2);
        assert_eq!(audio.len(), 44 + 12 * 16_000);
        assert_eq!(&audio.to_vec()[..4], b"RIFF");
        let pcm = pcm(&audio);
        let second = |s: usize| &pcm[s * 8000..(s + 1) * 8000];
        let loud = |xs: &[i16]| xs.iter().filter(|x| x.unsigned_abs() > 1000).count();
        // A tick is 80 ms of tone in a second of silence.
        let tick = second(3);
        assert!(loud(tick) > 300, "{}", loud(tick));
        assert!(tick[1000..].iter().all(|&x| x == 0), "silent between ticks");
        // The ten-second chime lasts longer than a tick.
        assert!(loud(second(10)) > 3 * loud(tick));
        // Minute zero: two pips for call 2, then silence.
        let pips = second(0);
        assert!(loud(&pips[..960]) > 300 && loud(&pips[1600..2560]) > 300);
        assert!(pips[3200..].iter().all(|&x| x == 0));
    }
}
