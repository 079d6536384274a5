"""A generated audio-sensing data set in the spirit of DeepEar (Lane et al., UbiComp 2015).

Eight sound classes a phone hears: silence, a male or a female talker, music, babble (several
talkers at once), white, pink and brown noise. Every recording is synthesised from a small
physical model, then goes through a room and a phone microphone, and the model input is a short
window of log-mel frames, as DeepEar's DNNs saw:

* speech: a glottal pulse train with a gliding, wobbling fundamental (two one-pole low-passes for
  the glottal pulse, a first difference for lip radiation) through three formant resonators that
  glide from one vowel to the next; syllables switch voicing on and off at 3-5 Hz, so a short
  window can fall mostly into a pause. Male and female talkers differ in pitch and vocal-tract
  length (formants about 17 % higher), with overlapping tails;
* music: chords (triads with the root doubled, or sevenths) of band-limited harmonic notes from
  per-recording wavetables (random harmonic roll-off and odd/even balance: the instrument),
  either plucked (exponential decay from an onset) or sustained with vibrato;
* noise: power spectra 1/f^beta with beta near 0 (white), 1 (pink), 2 (brown); babble sums 3-7
  talkers of either sex;
* each recording: a room (exponentially decaying noise tail after the direct path: RT60 and
  direct-to-reverberant ratio drawn per recording), ambient room tone (1/f^beta, beta in 1-2) at
  a drawn SNR below the source, a per-recording gain, a microphone with a high-pass and a
  spectral tilt, and a fixed electronic noise floor. Silence is the room tone alone.

Features (numpy only): 25 ms Hamming frames every 10 ms, 256-point FFT, 24 triangular mel bands
(DeepEar's 24 log filter banks) from 0 to 4 kHz, natural log. A sample is ``CONTEXT`` = 8
consecutive frames (95 ms), shaped ``(24, 8)`` = (mel band, frame): 192 inputs. Classes overlap on
purpose (pauses, low SNR, pitch tails, microphone tilt against noise colour) so that an
uncompressed DeepEar DNN stays below 100 %.
"""

from __future__ import annotations

import numpy as np

from deepfleet.data._dataset import Dataset, split_standardised

CLASSES = ("silence", "speech_male", "speech_female", "music", "babble", "white_noise",
           "pink_noise", "brown_noise")
RATE_HZ = 8000  # narrowband phone audio: every class's cues lie below 4 kHz, and synthesis stays cheap
FRAME, HOP, N_FFT = 200, 80, 256  # 25 ms frames every 10 ms (the usual speech front end); 31.25 Hz bins
N_MELS = 24  # DeepEar's 24 log filter banks
CONTEXT = 8  # frames per sample (95 ms): 24 x 8 = 192 inputs give the deepear DNN 2.3 M parameters
WINDOW = FRAME + (CONTEXT - 1) * HOP  # 760 samples the features see
CLIP = 1536  # samples synthesised per recording (192 ms): the first 776 let the room's reverberation build up
N_CONV = 4096  # FFT size for linear convolution of a clip with its room (>= 2 * CLIP)
N_TOTAL, N_VAL, N_TEST = 12000, 1500, 2000  # 1500 recordings per class; 8500 train
DATA_SEED = 0
CHUNK = 1024  # recordings synthesised at once: bounds memory (a few (CHUNK, N_CONV) arrays)
# Scales the nuisance spreads (SNR floor 25 - 22 d dB, pitch spread, room, gain, microphone tilt).
# Calibrated with the deepear DNN (15 epochs, seed 0): d = 1.0 gave 78.8 % test accuracy (noise
# colours and silence blur into each other), d = 0.6 gave 89.9 %: inside the 85-97 % band. At
# d = 0.6 `deepfleet compress deepear --data audio` (defaults, seed 0) trained it to 90.05 %, and
# DeepIoT kept 4.99 % of the parameters at 90.05 %.
DIFFICULTY = 0.6
EPS = 1e-10  # floor inside the log; far below the electronic noise floor's mel energy

# F1, F2, F3 (Hz) of an adult male's vowels (Peterson & Barney 1952 averages): a, i, u, E, O, ae
_VOWELS = np.array([[730, 1090, 2440], [270, 2290, 3010], [300, 870, 2240],
                    [530, 1840, 2480], [570, 840, 2410], [660, 1720, 2410]], dtype=float)
_FORMANT_BW = np.array([80.0, 100.0, 150.0])  # formant bandwidths (Hz)
_FEMALE_SCALE = 1.17  # female / male formant ratio (shorter vocal tract), Peterson & Barney
_F0_MALE, _F0_FEMALE = 115.0, 205.0  # median fundamentals (Hz); spread set by the difficulty
_CHORDS = np.array([[0, 4, 7, 12], [0, 3, 7, 12], [0, 4, 7, 10], [0, 4, 7, 11], [0, 5, 7, 12]])
_HARMONICS = 16  # per note; with roll-off >= 0.7 the 16th is >= 19 dB down
_TABLE = 256  # wavetable length (samples per period)
_NOISE_BETA = {"white_noise": 0.0, "pink_noise": 1.0, "brown_noise": 2.0}


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, rate: float = RATE_HZ) -> np.ndarray:
    """Triangular filters (n_mels, n_fft // 2 + 1) equally spaced on the HTK mel scale from 0 Hz
    to rate / 2, each with unit peak. Every filter covers at least one FFT bin at the defaults."""
    def mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    edges_mel = np.linspace(0.0, mel(np.array(rate / 2)), n_mels + 2)
    edges = 700.0 * (10 ** (edges_mel / 2595.0) - 1.0)  # (n_mels + 2,) Hz
    bins = np.arange(n_fft // 2 + 1) * rate / n_fft  # (F,) Hz
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (n_mels, 1) each
    rising = (bins[None] - lo) / (mid - lo)
    falling = (hi - bins[None]) / (hi - mid)
    return np.clip(np.minimum(rising, falling), 0.0, None)  # (n_mels, F)


def log_mel(x: np.ndarray) -> np.ndarray:
    """Log-mel features of signals x (n, L >= FRAME) at RATE_HZ: (n, N_MELS, frames), frames =
    1 + (L - FRAME) // HOP, natural log of the mel-band power plus EPS."""
    frames = np.lib.stride_tricks.sliding_window_view(x, FRAME, axis=-1)[:, ::HOP]  # (n, T, FRAME)
    spec = np.fft.rfft(frames * np.hamming(FRAME), n=N_FFT, axis=-1)  # (n, T, F)
    power = spec.real**2 + spec.imag**2  # (n, T, F)
    return np.log(power @ mel_filterbank().T + EPS).transpose(0, 2, 1)  # (n, N_MELS, T)


def _noise(rng: np.random.Generator, beta: np.ndarray, length: int) -> np.ndarray:
    """Gaussian noise (n, length) with power spectrum ~ 1/f^beta (f floored at 20 Hz), unit RMS."""
    f = np.maximum(np.fft.rfftfreq(N_CONV, 1 / RATE_HZ), 20.0) / 1000.0  # (F,) kHz
    spec = rng.standard_normal((len(beta), len(f))) + 1j * rng.standard_normal((len(beta), len(f)))
    x = np.fft.irfft(spec * f[None] ** (-beta[:, None] / 2), N_CONV)[:, :length]  # (n, length)
    return x / x.std(axis=1, keepdims=True)


def _syllables(rng: np.random.Generator, n: int, t: np.ndarray) -> np.ndarray:
    """Voicing envelopes (n, L) in [0, 1]: syllables at 3-5 Hz, voiced for 55-85 % of each."""
    rate, duty = rng.uniform(3.0, 5.0, n), rng.uniform(0.55, 0.85, n)
    cycle = (rate[:, None] * t[None] + rng.random(n)[:, None]) % 1.0  # (n, L) position in the syllable
    # raised-cosine on/off ramps of 20 % of the voiced part (no clicks)
    ramp = 0.2 * duty[:, None]
    up = np.clip(cycle / ramp, 0, 1)
    down = np.clip((duty[:, None] - cycle) / ramp, 0, 1)
    return 0.5 - 0.5 * np.cos(np.pi * np.minimum(up, down))


def speech(rng: np.random.Generator, f0: np.ndarray, scale: np.ndarray, *, length: int = CLIP) -> np.ndarray:
    """Voiced speech (S, length) of S talkers with median pitch f0 (S,) Hz and formant scale
    (S,) (1 = adult male vocal tract). Unit RMS per talker."""
    S = len(f0)
    t = np.arange(length) / RATE_HZ  # (L,)
    glide = 0.25 * rng.standard_normal(S)  # octaves over the clip: intonation
    wobble = 0.04 * np.sin(2 * np.pi * rng.uniform(2, 6, S)[:, None] * t[None] + rng.uniform(0, 2 * np.pi, S)[:, None])
    pitch = f0[:, None] * 2 ** (glide[:, None] * (t[None] / t[-1] - 0.5) + wobble)  # (S, L) Hz
    cycles = np.floor(np.cumsum(pitch / RATE_HZ, axis=1) + rng.random(S)[:, None])  # (S, L)
    pulses = np.diff(cycles, axis=1, prepend=cycles[:, :1])  # (S, L): 1 at each glottal closure
    breath = rng.uniform(0.005, 0.05, S)[:, None] * rng.standard_normal((S, length))  # aspiration
    excite = (pulses + breath) * _syllables(rng, S, t)  # (S, L)

    va, vb = rng.integers(0, len(_VOWELS), (2, S))
    mid, width = rng.uniform(0, 1, S), rng.uniform(0.03, 0.2, S)
    w = 1 / (1 + np.exp(-(t[None] / t[-1] - mid[:, None]) / width[:, None]))  # (S, L) vowel a -> b
    formants = scale[:, None, None] * (_VOWELS[va][:, :, None] * (1 - w[:, None]) + _VOWELS[vb][:, :, None] * w[:, None])
    r = np.exp(-np.pi * _FORMANT_BW / RATE_HZ)[None, :, None]  # (1, 3, 1) pole radii
    b = (2 * r * np.cos(2 * np.pi * formants / RATE_HZ)).transpose(2, 1, 0).copy()  # (L, 3, S)
    c = -(r**2)[0]  # (3, 1)
    a = 1 - b - c  # (L, 3, S): Klatt resonators, unit gain at 0 Hz
    pole = rng.uniform(0.85, 0.95, S)  # glottal pulse low-pass: -12 dB/octave above ~130-400 Hz
    excite_t = excite.T.copy()  # (L, S): time-major for the recursion
    g1, g2, g2_prev = np.zeros(S), np.zeros(S), np.zeros(S)
    y1, y2 = np.zeros((3, S)), np.zeros((3, S))  # resonator outputs at t-1, t-2
    out = np.empty((length, S))
    for i in range(length):  # the recursion is sequential in time, vectorised over talkers
        g1 = pole * g1 + excite_t[i]
        g2 = pole * g2 + g1
        u, g2_prev = g2 - g2_prev, g2  # lip radiation: +6 dB/octave
        for k in range(3):
            yk = a[i, k] * u + b[i, k] * y1[k] + c[k] * y2[k]
            y2[k], y1[k] = y1[k], yk
            u = yk
        out[i] = u
    out = out.T  # (S, L)
    return out / (out.std(axis=1, keepdims=True) + 1e-12)


def music(rng: np.random.Generator, n: int, length: int = CLIP) -> np.ndarray:
    """Chords (n, length) of four band-limited harmonic notes, plucked or sustained; unit RMS."""
    t = np.arange(length) / RATE_HZ  # (L,)
    midi = rng.integers(45, 70, n)[:, None] + _CHORDS[rng.integers(0, len(_CHORDS), n)]  # (n, 4): A2..A#4 roots
    f = 440.0 * 2 ** ((midi - 69) / 12)  # (n, 4) Hz
    k = np.arange(1, _HARMONICS + 1)  # (K,)
    rolloff, even = rng.uniform(0.7, 2.0, n), rng.uniform(0.1, 1.0, n)  # the instrument
    amp = k[None] ** -rolloff[:, None] * np.where(k % 2 == 0, even[:, None], 1.0)  # (n, K)
    amp = amp[:, None] * (f[:, :, None] * k < 0.95 * RATE_HZ / 2)  # (n, 4, K): no aliasing
    phi = rng.uniform(0, 2 * np.pi, (n, 4, _HARMONICS))
    grid = 2 * np.pi * np.arange(_TABLE) / _TABLE  # (TABLE,)
    table = np.einsum("nvk,nvkj->nvj", amp, np.sin(k[None, None, :, None] * grid + phi[..., None]))  # (n, 4, TABLE)

    sustained = rng.random(n) < 0.5
    vibrato = sustained[:, None] * rng.uniform(0.002, 0.008, n)[:, None] * np.sin(
        2 * np.pi * rng.uniform(4.5, 6.5, n)[:, None] * t[None] + rng.uniform(0, 2 * np.pi, n)[:, None])  # (n, L)
    phase = np.cumsum(f[:, :, None] * (1 + vibrato[:, None]) / RATE_HZ, axis=2) + rng.random((n, 4, 1))  # (n, 4, L)
    pos = (phase % 1.0) * _TABLE
    i0 = pos.astype(int) % _TABLE
    frac = pos - np.floor(pos)
    wave = (np.take_along_axis(table, i0, 2) * (1 - frac)
            + np.take_along_axis(table, (i0 + 1) % _TABLE, 2) * frac)  # (n, 4, L) linear interpolation

    onset = rng.uniform(-0.3, 0.15, n)[:, None] + rng.uniform(0, 0.03, (n, 4))  # (n, 4) s: strummed
    since = t[None, None] - onset[:, :, None]  # (n, 4, L)
    decay = np.where(sustained, np.inf, rng.uniform(0.1, 0.8, n))[:, None, None]
    env = np.clip(since / 0.005, 0, 1) * np.exp(-np.maximum(since, 0) / decay)  # 5 ms attack
    x = (wave * env).sum(axis=1)  # (n, L)
    return x / (x.std(axis=1, keepdims=True) + 1e-12)


def _talkers(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pitch (n,) Hz and formant scale (n,) of talkers of random sex."""
    female = rng.random(n) < 0.5
    return (np.where(female, _F0_FEMALE, _F0_MALE) * 2 ** (0.2 * rng.standard_normal(n)),
            np.where(female, _FEMALE_SCALE, 1.0) * (1 + 0.05 * rng.standard_normal(n)))


def _sources(rng: np.random.Generator, y: np.ndarray, d: float) -> np.ndarray:
    """Dry source signals (n, CLIP) with unit RMS for labels y; zeros for silence."""
    x = np.zeros((len(y), CLIP))
    for c, name in enumerate(CLASSES):
        idx = np.flatnonzero(y == c)
        if len(idx) == 0 or name == "silence":
            continue
        if name in ("speech_male", "speech_female"):
            female = name == "speech_female"
            spread = 0.15 + 0.1 * d  # octaves (1 sd) of the talkers' median pitch
            f0 = (_F0_FEMALE if female else _F0_MALE) * 2 ** (spread * rng.standard_normal(len(idx)))
            scale = (_FEMALE_SCALE if female else 1.0) * (1 + 0.05 * d * rng.standard_normal(len(idx)))
            x[idx] = speech(rng, f0, scale)
        elif name == "music":
            x[idx] = music(rng, len(idx))
        elif name == "babble":
            count = rng.integers(3, 8, len(idx))  # talkers per recording
            f0, scale = _talkers(rng, int(count.sum()))
            voices = speech(rng, f0, scale) * 10 ** (rng.uniform(-6, 6, len(f0)) / 20)[:, None]
            mix = np.add.reduceat(voices, np.concatenate([[0], np.cumsum(count)[:-1]]), axis=0)
            x[idx] = mix / mix.std(axis=1, keepdims=True)
        else:
            beta = _NOISE_BETA[name] + 0.15 * d * rng.standard_normal(len(idx))
            x[idx] = _noise(rng, beta, CLIP)
    return x


def _room(rng: np.random.Generator, n: int, d: float) -> np.ndarray:
    """Room transfer functions (n, N_CONV // 2 + 1): direct path plus an exponentially decaying
    Gaussian tail (RT60 0.15-0.8 s) at a direct-to-reverberant ratio drawn per room."""
    k = np.arange(CLIP)  # (L,)
    rt60 = rng.uniform(0.15, 0.8, n)
    drr_db = rng.uniform(15 - 15 * d, 15, n)
    tail = rng.standard_normal((n, CLIP)) * np.exp(-6.91 * k[None] / (rt60[:, None] * RATE_HZ))  # (n, L)
    tail[:, :8] = 0  # the first reflection arrives after 1 ms
    tail *= np.sqrt(10 ** (-drr_db / 10) / (tail**2).sum(axis=1))[:, None]
    tail[:, 0] = 1.0
    return np.fft.rfft(tail, N_CONV)


def _microphone(rng: np.random.Generator, n: int, d: float) -> np.ndarray:
    """Phone-microphone magnitude responses (n, N_CONV // 2 + 1): first-order high-pass at
    100-300 Hz times a spectral tilt of N(0, 1.5 d) dB per octave around 1 kHz."""
    f = np.maximum(np.fft.rfftfreq(N_CONV, 1 / RATE_HZ), 1.0)  # (F,)
    fc = rng.uniform(100, 300, n)[:, None]
    highpass = (f / fc) / np.sqrt(1 + (f / fc) ** 2)  # (n, F)
    tilt_db = 1.5 * d * rng.standard_normal(n)[:, None]
    return highpass * 10 ** (tilt_db * np.log2(f / 1000) / 20)


def _record(rng: np.random.Generator, y: np.ndarray, d: float) -> np.ndarray:
    """Recordings (n, CLIP) of the sources of labels y through room, ambient noise and phone."""
    n = len(y)
    dry = _sources(rng, y, d)  # (n, L)
    wet = np.fft.irfft(np.fft.rfft(dry, N_CONV) * _room(rng, n, d), N_CONV)[:, :CLIP]  # (n, L)
    ambient = _noise(rng, rng.uniform(1.0, 2.0, n), CLIP)  # (n, L) room tone, unit RMS
    ambient_db = rng.uniform(-60, -45, n)  # level in dB re full scale (RMS 1)
    snr_db = rng.uniform(25 - 22 * d, 30, n)  # source over room tone, over the whole clip
    src_db = np.where(y == CLASSES.index("silence"), -np.inf, ambient_db + snr_db)
    scale = 10 ** (src_db / 20) / (wet.std(axis=1) + 1e-12)
    mix = scale[:, None] * wet + 10 ** (ambient_db / 20)[:, None] * ambient
    mix *= 10 ** (rng.uniform(-8, 8, n) * d / 20)[:, None]  # per-recording gain (distance, AGC)
    heard = np.fft.irfft(np.fft.rfft(mix, N_CONV) * _microphone(rng, n, d), N_CONV)[:, :CLIP]
    return heard + 10 ** (-80 / 20) * rng.standard_normal((n, CLIP))  # electronic noise floor


def generate(n: int = N_TOTAL, seed: int = DATA_SEED, difficulty: float = DIFFICULTY) -> tuple[np.ndarray, np.ndarray]:
    """Return X (n, N_MELS, CONTEXT) float32 log-mel windows and y (n,) int64 labels (balanced:
    label i % len(CLASSES), shuffled). The same (n, seed, difficulty) gives the same arrays.
    ``difficulty`` scales SNR range, pitch spread, room, gain and microphone variability."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(CLASSES)
    rng.shuffle(y)
    X = np.empty((n, N_MELS, CONTEXT), dtype=np.float32)
    for start in range(0, n, CHUNK):
        part = slice(start, min(n, start + CHUNK))
        X[part] = log_mel(_record(rng, y[part], difficulty)[:, CLIP - WINDOW :])  # (m, N_MELS, CONTEXT)
    return X, y.astype(np.int64)


def load_audio() -> Dataset:
    X, y = generate()  # standardised per band
    return split_standardised(
        "audio", X, y, (N_VAL, N_TEST), DATA_SEED, per_channel=True, num_classes=len(CLASSES),
        description=(
            f"generated audio (8 kHz): {N_MELS} log-mel bands x {CONTEXT} frames of 10 ms, "
            f"{len(CLASSES)} classes ({', '.join(CLASSES)})"
        ))
