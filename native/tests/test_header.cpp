// The headers compile as C++ (and test_header_c99.c as strict C99); the ABI's constants and types are usable, and
// lipforcing.hpp turns a refused configuration into an Error with the status (checked in C: no Python starts).
//
//   test_header_cxx                 the header checks above
//   test_header_cxx session DIR     two sessions in turn on one lipforcing::Engine (Session(Engine&)) over the clip
//                                   of make_clip.py: each gives the frames capi_session wrote (lf_create's session)
#include "lipforcing.hpp"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

static std::vector<char> read_file(const std::string &path) {
    std::ifstream in(path, std::ios::binary);
    return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

static int engine_sessions(const std::string &dir) {
    std::ifstream meta(dir + "/meta.txt");
    int width = 0, height = 0, count = 0, expected = 0;
    if (!(meta >> width >> height >> count >> expected)) {
        std::fprintf(stderr, "skip: no clip in %s (the shared clips are absent)\n", dir.c_str());
        return 77;
    }
    const std::vector<char> frames = read_file(dir + "/frames.rgb"), speech = read_file(dir + "/speech.f32");
    const std::vector<char> reference = read_file(dir + "/capi_frames.rgb");
    const size_t frame_bytes = static_cast<size_t>(width) * height * 3;
    if (frames.size() != frame_bytes * count || reference.size() != frame_bytes * expected) {
        std::fprintf(stderr, "clip files: %zu frame bytes, %zu of capi_session's\n", frames.size(), reference.size());
        return 1;
    }
    lipforcing::Config config;
    config.model = "tiny";
    config.device = "cpu";
    config.encoder = "taehv";
    lipforcing::Engine engine(config);
    for (int round = 0; round < 2; round++) {  // the second session reuses the engine's weights and parts
        lipforcing::Session session(engine);
        session.push_speech(reinterpret_cast<const float *>(speech.data()), speech.size() / sizeof(float), 16000);
        session.end_speech();
        std::vector<char> out;
        bool shapes = true;
        auto take = [&](const lipforcing::Frame &frame) {  // rows of width * 3 bytes, whatever the stride
            shapes = shapes && frame.width() == width && frame.height() == height &&
                     frame.index() == static_cast<int64_t>(out.size() / frame_bytes);
            for (int y = 0; y < height; y++) {
                const auto *row = reinterpret_cast<const char *>(frame.data()) + frame.stride() * y;
                out.insert(out.end(), row, row + static_cast<size_t>(width) * 3);
            }
        };
        for (int i = 0; i < count; i++) {
            session.push_frame(reinterpret_cast<const uint8_t *>(frames.data()) + frame_bytes * i, width, height,
                               static_cast<size_t>(width) * 3);
            while (auto frame = session.pop(0)) take(*frame);
        }
        session.close();
        while (auto frame = session.pop(-1)) take(*frame);
        if (session.status() != LF_END || !shapes || out != reference) {
            std::fprintf(stderr, "session %d on the engine: %s, %zu bytes out, %zu expected, %s\n", round,
                         lf_status_name(session.status()), out.size(), reference.size(),
                         out == reference ? "equal" : "different from capi_session's frames");
            return 1;
        }
    }
    std::printf("engine sessions: 2 x %d frames equal to capi_session's\n", expected);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && std::strcmp(argv[1], "session") == 0) {
        try {
            return engine_sessions(argv[2]);
        } catch (const lipforcing::Error &e) {
            std::fprintf(stderr, "%s\n", e.what());
            return 1;
        }
    }
    lipforcing::Config config;
    lf_frame frame = {};
    lf_frame_release(&frame);
    std::printf("lipforcing %s (%d, ABI %d), %s\n", lf_version(), lf_version_number(), lf_abi_version(),
                lf_status_name(LF_ERR_STATE));
    if (config.size != sizeof(lf_config) || config.abi_version != LF_ABI_VERSION) return 1;
    if (lf_version_number() != LF_VERSION_MAJOR * 10000 + LF_VERSION_MINOR * 100 + LF_VERSION_PATCH) return 1;
    config.model = "nope";
    try {
        lipforcing::Session session(config);
        return 1;
    } catch (const lipforcing::Error &e) {
        std::printf("%s\n", e.what());
        if (e.status() != LF_ERR_CONFIG || !std::strstr(e.what(), "unknown model 'nope'")) return 1;
    }
    try {
        lipforcing::Engine engine(config);
        return 1;
    } catch (const lipforcing::Error &e) {
        if (e.status() != LF_ERR_CONFIG || !std::strstr(e.what(), "lf_engine_create: unknown model")) return 1;
    }
    lipforcing::Frame empty;
    return empty.data() == nullptr ? 0 : 1;
}
