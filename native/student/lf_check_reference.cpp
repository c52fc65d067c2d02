// lf_check_reference DIR golden.safetensors [--device cpu|cuda]: the C++ student (lf_student, no Python) on a
// golden file's inputs, with the relative errors `lipforcing check-reference` prints; exit 1 above 1e-4, 2 (with
// one line on stderr) when the packages or the golden file cannot be read or do not fit each other.
#include <c10/util/Exception.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <iostream>

#include "lf_student.h"

namespace {

// One line for the user: libtorch's messages carry a C++ stack after the first line.
int error_line(const char *golden, const char *what) {
    std::string text(what);
    text = text.substr(0, text.find('\n'));
    if (text.rfind(std::string(golden) + ": ", 0) == 0) text = text.substr(std::strlen(golden) + 2);
    std::fprintf(stderr, "lf_check_reference: %s: %s\n", golden, text.c_str());
    return 2;
}

const torch::Tensor &tensor(const std::map<std::string, torch::Tensor> &golden, const std::string &name) {
    auto found = golden.find(name);
    if (found == golden.end()) throw std::runtime_error("no tensor '" + name + "' (not a streaming golden file)");
    return found->second;
}

}  // namespace

int main(int argc, char **argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: lf_check_reference AOT_DIR golden.safetensors [--device cpu|cuda]\n");
        return 2;
    }
    std::string device = argc >= 5 && !std::strcmp(argv[3], "--device") ? argv[4] : "cpu";
    try {
        std::map<std::string, std::string> meta;
        auto g = lf::read_safetensors(argv[2], &meta);
        if (meta["format"] != "lipforcing-golden/1") {
            std::fprintf(stderr, "lf_check_reference: %s: format '%s', expected 'lipforcing-golden/1'\n", argv[2],
                         meta["format"].c_str());
            return 2;
        }
        torch::NoGradGuard no_grad;
        lf::Student student(argv[1], device);
        const int c = student.config().chunk_frames;
        auto at = [&](const char *name) -> const torch::Tensor & { return tensor(g, name); };
        auto &noise = at("inputs/noise");
        const int frames = (int)noise.size(2);
        student.start_clip(at("inputs/text_context"), at("inputs/audio_emb"), at("inputs/ref_latent"),
                           at("inputs/mask_latent"));
        std::vector<torch::Tensor> x0_step0, x0;
        torch::Tensor first_flow;
        auto began = std::chrono::steady_clock::now();
        for (int s = 0; s + c <= frames; s += c) {
            auto slice = [&](const char *name) { return at(name).narrow(2, s, c); };
            auto out = student.run_chunk(slice("inputs/masked_video"), slice("inputs/ref_sequence"),
                                         slice("inputs/noise"), slice("inputs/renoise"));
            if (s == 0) first_flow = out.first_flow;
            x0_step0.push_back(out.x0_step0);
            x0.push_back(out.x0);
        }
        double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count();
        auto worst = [&](const std::vector<torch::Tensor> &got, const torch::Tensor &ref) {
            double w = 0;
            for (size_t i = 0; i < got.size(); i++)
                w = std::max(w, lf::rel_error(got[i], ref.narrow(2, (int64_t)i * c, c)));
            return w;
        };
        auto &ref_step0 = at("outputs/x0_step0"), &ref_x0 = at("outputs/x0");
        double errors[5] = {lf::rel_error(first_flow, at("outputs/first_call_flow")),
                            lf::rel_error(torch::cat(x0_step0, 2), ref_step0), worst(x0_step0, ref_step0),
                            lf::rel_error(torch::cat(x0, 2), ref_x0), worst(x0, ref_x0)};
        double w = *std::max_element(errors, errors + 5);
        std::printf("%-28s %16s %10s %13s %10s %13s\n", "file", "first_call_flow", "x0_step0", "(worst chunk)", "x0",
                    "(worst chunk)");
        std::string name = argv[2];
        name = name.substr(name.find_last_of('/') + 1);
        std::printf("%-28s %16.2e %10.2e %13.2e %10.2e %13.2e  %s\n", name.c_str(), errors[0], errors[1], errors[2],
                    errors[3], errors[4], w <= 1e-4 ? "ok" : "FAIL");
        std::printf("worst relative error %.2e (bound 1e-04, C++ student on %s, %d chunks in %.3f s): %s\n", w,
                    device.c_str(), frames / c, seconds, w <= 1e-4 ? "pass" : "FAIL");
        return w <= 1e-4 ? 0 : 1;
    } catch (const c10::Error &e) {
        return error_line(argv[2], e.what_without_backtrace());
    } catch (const std::exception &e) {
        return error_line(argv[2], e.what());
    }
}
