#!/usr/bin/env python3
"""Quality benchmark for the fleetcall-dsp pipeline.

Steps (all reproducible: fixed seeds, TTS and `sox -R` are deterministic):

  corpus   build 48 kHz mono WAV clips: TTS talkers (flite) in sox/numpy-made
           noises (pink, brown, mains hum + fan, babble of espeak-ng voices,
           keyboard clicks) at SNR 0/5/10/20 dB, distant talkers (speech 20 and
           30 dB below normal level in the same room noise) and clean speech
  process  run each clip through the Rust CLI (`--example quality`) in every mode
  score    PESQ (wideband), STOI and DNSMOS (SIG/BAK/OVRL, speechmos ONNX models,
           offline) for the noisy input and every mode; writes CSV, prints tables

Usage: quality.py all|corpus|process|score --work DIR [--cli PATH] [--talkers N]
       [--modes opus,transcode,rnnoise,pipeline] [--extra "--speech-limit 6 ..."]
"""

import argparse
import concurrent.futures
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

FS = 48_000
CLIP_SECONDS = 10.5
NOISE_SECONDS = 14.0
NORMAL_SPEECH_DBFS = -26.0   # active speech level of a near talker (ITU-T P.56 habit)
ROOM_NOISE_DBFS = -46.0      # room noise for the distant cases: a near talker would have 20 dB SNR
SNRS = [0, 5, 10, 20]
DISTANCES = [20, 30]         # dB below the normal speech level
NOISES = ["pink", "brown", "hvac", "babble", "keyboard"]
# Condition name -> CLI mode and options. "noisy" (the input itself) is scored too.
CONDITIONS = {
    "opus": ("opus", []),                      # sender -> receiver, what forwarding gives
    "transcode": ("transcode", []),            # server decode + re-encode, no suppression
    "rnnoise": ("rnnoise", []),                # plain RNNoise, no protection
    "pipeline": ("pipeline", []),              # PipelineConfig::default(): VoIP coder, FEC
    "pipeline_ld": ("pipeline", ["--low-delay"]),  # PipelineConfig::low_delay(): CELT, no FEC
}
MODES = list(CONDITIONS)

# Talkers: flite voices reading our own sentences; three sentences each.
TALKERS = [
    ("slt", [
        "The nurse asked the patient to describe the pain in his left shoulder.",
        "Please bring the blue folder to room twelve before the meeting starts.",
        "A quiet voice from the back of the room can still be understood.",
    ]),
    ("rms", [
        "Turn the valve slowly until the pressure gauge reads forty units.",
        "The school bus leaves the north gate at a quarter past three.",
        "Every morning the team checks the list of devices that went offline.",
    ]),
    ("awb", [
        "Her answer was short, but it settled the question for the whole group.",
        "Write the dosage on the chart and sign it with the time of day.",
        "The fan in the hallway has been making that noise since Tuesday.",
    ]),
]

# Babble: espeak-ng voices with different pitch and speed, other sentences.
BABBLE = [
    ("en-us", 150, 40, "We should order more paper before the end of the month, I think."),
    ("en-gb+f3", 165, 60, "Did you see the game last night? It went into extra time again."),
    ("en-gb-scotland", 140, 35, "The printer on the second floor is jammed and nobody can fix it."),
    ("en-029+f2", 170, 70, "Lunch is at noon today because of the fire drill this afternoon."),
    ("en-gb-x-rp+m3", 155, 45, "I left my keys in the car, can somebody let me back in later."),
    ("en-us+f4", 160, 65, "The new schedule starts on Monday and everybody has to sign in."),
    ("en-gb+m2", 145, 50, "Coffee machine is broken again, so we walked to the corner shop."),
]


def run(cmd, **kw):
    subprocess.run(cmd, check=True, **kw)


def read(path):
    x, fs = sf.read(path, dtype="float32")
    if x.ndim > 1:
        x = x.mean(axis=1)
    assert fs == FS, (path, fs)
    return x.astype(np.float64)


def write(path, x):
    # scipy writes no timestamp (libsndfile's PEAK chunk has one): same bytes every run.
    from scipy.io import wavfile
    wavfile.write(path, FS, x.astype(np.float32))


def to48k(src, dst):
    # Fixed-quality resampling; -R makes sox repeatable.
    run(["sox", "-R", "-q", str(src), "-r", str(FS), "-c", "1", "-b", "32", "-e", "floating-point",
         str(dst), "rate", "-v", str(FS)])


def db(x):
    return 10 * math.log10(max(x, 1e-20))


def active_level(x):
    """Active speech level in dBFS: RMS over 10 ms frames within 35 dB of the loudest
    (a simple stand-in for ITU-T P.56)."""
    frames = x[: len(x) // 480 * 480].reshape(-1, 480)
    energy = (frames ** 2).mean(axis=1)
    active = energy > energy.max() * 10 ** (-35 / 10)
    return db(energy[active].mean())


def rms_level(x):
    return db((x ** 2).mean())


def scale_to(x, level_dbfs, measure):
    return x * 10 ** ((level_dbfs - measure(x)) / 20)


def tts_flite(voice, text, dst, tmp):
    raw = tmp / f"{dst.stem}.raw.wav"
    run(["flite", "-voice", voice, "-t", text, "-o", str(raw)])
    to48k(raw, dst)


def tts_espeak(voice, speed, pitch, text, dst, tmp):
    raw = tmp / f"{dst.stem}.raw.wav"
    run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(raw), text])
    to48k(raw, dst)


def fit(x, n):
    """Repeat or cut `x` to `n` samples."""
    reps = int(math.ceil(n / len(x)))
    return np.tile(x, reps)[:n]


def make_talker(voice, sentences, tmp):
    parts = []
    gap = np.zeros(int(0.35 * FS))
    for i, text in enumerate(sentences):
        path = tmp / f"talker_{voice}_{i}.wav"
        tts_flite(voice, text, path, tmp)
        parts += [read(path), gap]
    speech = np.concatenate([np.zeros(int(0.3 * FS))] + parts)
    speech = fit(speech, int(CLIP_SECONDS * FS)) if len(speech) < CLIP_SECONDS * FS else speech[: int(CLIP_SECONDS * FS)]
    return scale_to(speech, NORMAL_SPEECH_DBFS, active_level)


def sox_noise(kind, dst, extra=()):
    run(["sox", "-R", "-q", "-n", "-r", str(FS), "-c", "1", "-b", "32", "-e", "floating-point", str(dst),
         "synth", str(NOISE_SECONDS), kind, *extra])


def make_noises(tmp, rng):
    n = int(NOISE_SECONDS * FS)
    t = np.arange(n) / FS
    noises = {}

    sox_noise("pinknoise", tmp / "pink.wav")
    noises["pink"] = read(tmp / "pink.wav")
    sox_noise("brownnoise", tmp / "brown.wav")
    noises["brown"] = read(tmp / "brown.wav")

    # HVAC: 50 Hz mains hum with odd-heavy harmonics, plus a fan: low-passed pink
    # noise with a slow blade-rate modulation and a 120 Hz blade tone.
    hum = sum(a * np.sin(2 * np.pi * 50 * k * t + k) for k, a in [(1, 1.0), (2, 0.5), (3, 0.6), (5, 0.3), (7, 0.15)])
    sox_noise("pinknoise", tmp / "fan.wav", ["lowpass", "900", "lowpass", "900"])
    fan = read(tmp / "fan.wav")[:n]
    fan = fan * (1 + 0.3 * np.sin(2 * np.pi * 4.0 * t)) + 0.02 * np.sin(2 * np.pi * 120 * t) * np.std(fan) / 0.02
    noises["hvac"] = hum / np.std(hum) * 0.5 + fan / np.std(fan)

    # Babble: several espeak-ng talkers, each looped at a random offset.
    babble = np.zeros(n)
    for i, (voice, speed, pitch, text) in enumerate(BABBLE):
        path = tmp / f"babble_{i}.wav"
        tts_espeak(voice, speed, pitch, text, path, tmp)
        voice_sig = read(path)
        voice_sig = np.concatenate([voice_sig, np.zeros(int(0.2 * FS))])
        voice_sig = np.roll(fit(voice_sig, n), int(rng.integers(0, n)))
        babble += voice_sig / np.sqrt((voice_sig ** 2).mean())
    noises["babble"] = babble

    # Keyboard: clicks (decaying resonant noise bursts) at typing rhythm over a
    # quiet pink bed.
    keys = np.zeros(n)
    pos = 0.2
    while pos < NOISE_SECONDS - 0.1:
        length = int(rng.uniform(0.006, 0.018) * FS)
        burst = rng.standard_normal(length) * np.exp(-np.arange(length) / (length / 4))
        freq = rng.uniform(1500, 4500)
        r = 0.97
        w = 2 * np.pi * freq / FS
        y = np.zeros(length)
        for k in range(length):
            y[k] = burst[k] + 2 * r * np.cos(w) * (y[k - 1] if k else 0) - r * r * (y[k - 2] if k > 1 else 0)
        start = int(pos * FS)
        keys[start:start + length] += y / np.abs(y).max() * rng.uniform(0.4, 1.0)
        pos += rng.exponential(0.16) if rng.random() > 0.1 else rng.uniform(0.6, 1.5)
    bed = noises["pink"]
    noises["keyboard"] = keys / np.std(keys) + 0.05 * bed / np.std(bed)
    return noises


def build_corpus(work, n_talkers):
    rng = np.random.default_rng(20_251_122)
    tmp = work / "tmp"
    clean_dir = work / "clean"
    noisy_dir = work / "noisy"
    for d in (tmp, clean_dir, noisy_dir):
        d.mkdir(parents=True, exist_ok=True)
    noises = make_noises(tmp, rng)
    n = int(CLIP_SECONDS * FS)
    rows = []
    for voice, sentences in TALKERS[:n_talkers]:
        speech = make_talker(voice, sentences, tmp)
        cases = [("clean", "near", None, NORMAL_SPEECH_DBFS), ("clean", "distant30", None, NORMAL_SPEECH_DBFS - 30)]
        for noise in NOISES:
            cases += [(noise, f"snr{snr}", NORMAL_SPEECH_DBFS - snr, NORMAL_SPEECH_DBFS) for snr in SNRS]
            cases += [(noise, f"distant{d}", ROOM_NOISE_DBFS, NORMAL_SPEECH_DBFS - d) for d in DISTANCES]
        for noise, case, noise_dbfs, speech_dbfs in cases:
            name = f"{voice}_{noise}_{case}"
            s = speech * 10 ** ((speech_dbfs - NORMAL_SPEECH_DBFS) / 20)
            mix = s.copy()
            if noise_dbfs is not None:
                offset = int(rng.integers(0, len(noises[noise]) - n))
                nz = noises[noise][offset:offset + n]
                mix += scale_to(nz, noise_dbfs, rms_level)
            # Impulsive noise (keyboard) at low SNR can exceed full scale: lower the
            # whole clip, keeping the SNR, and record the level actually used.
            peak = np.abs(mix).max()
            if peak > 0.9:
                s, mix = s * 0.9 / peak, mix * 0.9 / peak
                speech_dbfs += 20 * math.log10(0.9 / peak)
                noise_dbfs += 20 * math.log10(0.9 / peak)
            write(clean_dir / f"{name}.wav", s)
            write(noisy_dir / f"{name}.wav", mix)
            snr = speech_dbfs - noise_dbfs if noise_dbfs is not None else float("inf")
            rows.append(dict(clip=name, talker=voice, noise=noise, case=case, snr_db=snr,
                             speech_dbfs=speech_dbfs))
    with open(work / "corpus.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"corpus: {len(rows)} clips in {noisy_dir}")


def corpus_rows(work):
    with open(work / "corpus.csv") as f:
        return list(csv.DictReader(f))


def process(work, cli, modes, extra, jobs):
    rows = corpus_rows(work)
    tasks = []
    for mode in modes:
        (work / mode).mkdir(exist_ok=True)
        for r in rows:
            tasks.append((mode, r["clip"]))

    def one(task):
        cond, clip = task
        mode, options = CONDITIONS[cond]
        cmd = [cli, str(work / "noisy" / f"{clip}.wav"), str(work / cond / f"{clip}.wav"), "--mode", mode]
        cmd += options
        if mode == "pipeline":
            cmd += extra
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
        return mode, clip, dict(kv.split("=") for kv in out.split())

    stats = {}
    with concurrent.futures.ThreadPoolExecutor(jobs) as ex:
        for mode, clip, kv in ex.map(one, tasks):
            stats[(mode, clip)] = kv
    with open(work / "process.csv", "w", newline="") as f:
        keys = sorted({k for kv in stats.values() for k in kv})
        w = csv.writer(f)
        w.writerow(["mode", "clip"] + keys)
        for (mode, clip), kv in sorted(stats.items()):
            w.writerow([mode, clip] + [kv.get(k, "") for k in keys])
    print(f"process: {len(tasks)} runs")


def score_one(args):
    work, clip, cond = args
    from pesq import pesq
    from pystoi import stoi
    from scipy.signal import resample_poly
    from speechmos import dnsmos

    ref = resample_poly(read(work / "clean" / f"{clip}.wav"), 1, 3)
    deg = resample_poly(read(work / cond / f"{clip}.wav"), 1, 3)
    deg = deg[: len(ref)]
    out = dict(clip=clip, cond=cond)
    try:
        out["pesq"] = pesq(16_000, ref, deg, "wb")
    except Exception:  # PESQ refuses clips it finds no speech in
        out["pesq"] = float("nan")
    out["stoi"] = stoi(ref, deg, 16_000, extended=False)
    m = dnsmos.run(np.clip(deg, -1, 1).astype(np.float32), 16_000)
    out.update(sig=m["sig_mos"], bak=m["bak_mos"], ovrl=m["ovrl_mos"])
    return out


def score(work, modes, jobs):
    rows = corpus_rows(work)
    conds = ["noisy"] + modes
    tasks = [(work, r["clip"], c) for r in rows for c in conds]
    results = []
    with concurrent.futures.ProcessPoolExecutor(jobs) as ex:
        for res in ex.map(score_one, tasks, chunksize=4):
            results.append(res)
    meta = {r["clip"]: r for r in rows}
    with open(work / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["clip", "talker", "noise", "case", "snr_db", "speech_dbfs", "condition",
                    "pesq_wb", "stoi", "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl"])
        for r in results:
            m = meta[r["clip"]]
            w.writerow([r["clip"], m["talker"], m["noise"], m["case"], m["snr_db"], m["speech_dbfs"], r["cond"],
                        f"{r['pesq']:.3f}", f"{r['stoi']:.4f}", f"{r['sig']:.3f}", f"{r['bak']:.3f}",
                        f"{r['ovrl']:.3f}"])
    print(f"scores: {len(results)} in {work / 'scores.csv'}")
    report(work, conds)


def report(work, conds):
    with open(work / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    groups = {}
    for r in rows:
        groups.setdefault((r["noise"], r["case"]), {}).setdefault(r["condition"], []).append(r)

    def mean(rs, k):
        v = [float(r[k]) for r in rs if r[k] != "nan"]
        return sum(v) / len(v) if v else float("nan")

    def delta(g, k, cond):
        return mean(groups[g].get(cond, []), k) - mean(groups[g].get("opus", []), k)

    order = {n: i for i, n in enumerate(["clean"] + NOISES)}
    cases = ["near"] + [f"snr{s}" for s in SNRS] + [f"distant{d}" for d in DISTANCES]
    keys = sorted(groups, key=lambda k: (order.get(k[0], 99), cases.index(k[1]) if k[1] in cases else 99))
    processed = [c for c in ("rnnoise", "pipeline", "pipeline_ld") if c in conds]
    short = {"noisy": "noisy", "opus": "opus", "transcode": "transcode", "rnnoise": "plain RNNoise",
             "pipeline": "pipeline", "pipeline_ld": "pipeline LD"}
    metrics = [("stoi", "STOI"), ("dnsmos_ovrl", "DNSMOS OVRL"), ("dnsmos_bak", "DNSMOS BAK"),
               ("dnsmos_sig", "DNSMOS SIG"), ("pesq_wb", "PESQ-WB")]
    talkers = len({r["talker"] for r in rows})
    lines = []
    for key, label in metrics:
        lines.append(f"\n{label} (mean over {talkers} talkers)\n")
        lines.append("| case | " + " | ".join(short[c] for c in conds) + " | "
                     + " | ".join(f"{short[c]} - opus" for c in processed) + " |")
        lines.append("|---|" + "---:|" * (len(conds) + len(processed)))
        for g in keys:
            vals = [mean(groups[g].get(c, []), key) for c in conds]
            lines.append(f"| {g[0]} {g[1]} | " + " | ".join(f"{v:.3f}" for v in vals) + " | "
                         + " | ".join(f"{delta(g, key, c):+.3f}" for c in processed) + " |")

    lines.append("\nTarget checks (differences to the Opus-only path)\n")
    protect = [g for g in keys if g[1].startswith("distant") or g[0] == "clean"]
    near = [g for g in keys if g[1].startswith("snr")]
    for c in processed:
        if protect:
            d, g = min((delta(g, "stoi", c), g) for g in protect)
            lines.append(f"- {short[c]}: distant-talker and clean cases, worst STOI change {d:+.3f} "
                         f"({g[0]} {g[1]}), target >= -0.020: {'met' if d >= -0.02 else 'NOT met'}")
        for k, label in [("dnsmos_ovrl", "OVRL"), ("dnsmos_bak", "BAK")]:
            ds = [(delta(g, k, c), g) for g in near]
            if ds:
                d, g = min(ds)
                raised = sum(1 for x, _ in ds if x > 0)
                lines.append(f"- {short[c]}: near noisy cases, DNSMOS {label} raised in {raised}/{len(ds)}, "
                             f"mean {sum(x for x, _ in ds) / len(ds):+.3f}, smallest {d:+.3f} ({g[0]} {g[1]})")
    text = "\n".join(lines)
    print(text)
    (work / "table.md").write_text(text + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["all", "corpus", "process", "score", "report"])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--cli", default="target/release/examples/quality")
    p.add_argument("--talkers", type=int, default=len(TALKERS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--extra", default="", help="extra CLI options for --mode pipeline")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    a = p.parse_args()
    modes = a.modes.split(",")
    a.work.mkdir(parents=True, exist_ok=True)
    if a.step in ("all", "corpus"):
        build_corpus(a.work, a.talkers)
    if a.step in ("all", "process"):
        process(a.work, a.cli, modes, a.extra.split(), a.jobs)
    if a.step in ("all", "score"):
        score(a.work, modes, a.jobs)
    if a.step == "report":
        report(a.work, ["noisy"] + modes)


if __name__ == "__main__":
    sys.exit(main())
