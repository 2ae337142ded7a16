"""The recipe's mel front end in torchaudio, shared by the Python references of the benchmarks
(frontend_reference.py, predict_reference.py, train_step_reference.py): MelSpectrogram(32 kHz,
n_fft 2028, hop 835, 20-16000 Hz, 128 HTK mels, power 2, norm=None) + AmplitudeToDB(power,
top_db 80) per clip, then the notebook's z-score and min-max per clip and 3 tiled channels.
"""
import torch
import torchaudio

SAMPLE_RATE, N_FFT, HOP = 32000, 2028, 835


class NotebookFrontEnd:
    def __init__(self, device="cpu"):
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE, n_fft=N_FFT, win_length=N_FFT, hop_length=HOP, f_min=20,
            f_max=16000, n_mels=128, power=2.0, center=True, pad_mode="reflect", norm=None,
            mel_scale="htk").to(device)
        self.to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=80).to(device)

    def db(self, x):
        """[B, samples] -> [B, 1, mels, frames] in dB, top_db per clip."""
        return self.to_db(self.mel(x).unsqueeze(1))

    @staticmethod
    def normalize(d):
        """The notebook's per-clip z-score, then min-max to [0, 1]."""
        mean = d.mean(dim=(1, 2, 3), keepdim=True)
        std = d.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
        z = (d - mean) / std
        lo, hi = z.amin(dim=(1, 2, 3), keepdim=True), z.amax(dim=(1, 2, 3), keepdim=True)
        return (z - lo) / (hi - lo)

    @staticmethod
    def tile(z, fmt=torch.contiguous_format):
        """3 channels, materialised in `fmt` (as aviary's output is)."""
        return z.expand(-1, 3, -1, -1).contiguous(memory_format=fmt)

    def __call__(self, x, fmt=torch.contiguous_format):
        return self.tile(self.normalize(self.db(x)), fmt)
