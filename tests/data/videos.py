"""The tiny video folder of the data tests: names, colours, captions, how it is written."""

import numpy as np

# One colour per video, so a clip can be traced back to its file after lossy coding.
VIDEO_COLORS = [(220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 30),
                (30, 220, 220), (220, 30, 220), (240, 240, 240), (128, 64, 0)]
VIDEO_NAMES = ["a.mp4", "b.webm", "c.gif", "d.avi", "e.mp4", "sub/f.gif", "g.webm", "h.mp4"]
CAPTIONS = {"a.mp4": "first, with a comma", "c.gif": "from the csv"}
TXT_CAPTIONS = {"b.webm": "from a txt file", "sub/f.gif": "nested txt"}


def _frames(color, n=8, h=32, w=32):
    # A solid colour plus a moving bright bar, so frames differ over time.
    frames = np.zeros((n, h, w, 3), np.uint8) + np.asarray(color, np.uint8)
    for t in range(n):
        frames[t, :, (t * 3) % w: (t * 3) % w + 3] = 255
    return frames


def _write_avi(path, frames, fps):
    import imageio.v2 as iio2

    with iio2.get_writer(path, format="FFMPEG", fps=fps, codec="mjpeg", macro_block_size=1) as w:
        for f in frames:
            w.append_data(f)
