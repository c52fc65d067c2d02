"""The media path: everything between files / frames and the 512x512 aligned faces the model sees.

    io.py               video and audio in and out with PyAV (atomic MP4 writer)
    length.py           the clip-length rule of SPEC §6, chunk frame ranges, ping-pong extension
    face.py             face detection, landmarks and the SPEC §8 alignment; warps (cv2 / torch)
    mask.py             the mouth mask (built-in LatentSync shape or a user's image) at every size
    paste_back.py       the generated face blended back into the frame (SPEC §8)
    audio_features.py   per-video-frame wav2vec2 features (SPEC §7)
    live_audio.py       speech arriving live: a 16 kHz buffer, windowed features, the look-ahead figures

Imports: ``engine.errors`` only (no model code): the application layer joins media and models.
"""
