// lf_student: the causal student's streaming loop in C++, without a Python interpreter. It runs the
// AOTInductor packages written by `lipforcing export-aot` (torch::inductor::AOTIModelPackageLoader) and holds
// the sink + window KV cache and the 2-step sampler itself.
//
//   lf::Student student("aot/", "cpu");
//   student.start_clip(text_context, audio_emb, ref_latent, mask_latent);
//   for (chunk b) { auto out = student.run_chunk(masked[b], ref_sequence[b], noise[b], renoise[b]); use(out.x0); }
//
// Per chunk (SPEC §2, §5): x0_a = x - t0 flow(x, t0); x = (1 - t1) x0_a + t1 renoise; x0 = x - t1 flow(x, t1);
// then the commit call at t = 0 on x0 gives the chunk's raw K/V, which the cache keeps for the frames the next
// chunk sees. The first two calls read the cache and do not write it.
#pragma once

#include <torch/torch.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace lf {

struct ChunkResult {
    torch::Tensor first_flow;  // raw flow of the first denoising call [1, 16, 3, h, w]
    torch::Tensor x0_step0;    // x0 after the first call
    torch::Tensor x0;          // the chunk's clean latent
};

struct AotConfig {
    int layers = 0, heads = 0, head_dim = 0, tokens_per_frame = 0, chunk_frames = 3, sink_frames = 1,
        window_frames = 7, audio_dim = 0, latent_h = 0, latent_w = 0, text_len = 0, text_dim = 0;
    std::vector<double> t_list;
    double commit_t = 0.0;
    std::vector<int> shapes;  // cached frames of each package (call_c<N>.pt2)
    static AotConfig read(const std::string &path);
};

class Student {
  public:
    Student(const std::string &dir, const std::string &device = "cpu");
    ~Student();
    const AotConfig &config() const { return cfg_; }
    // text_context [1, text_len, text_dim]; audio_emb [1, V, audio_dim] (V = 1 + 4(L - 1)); ref_latent
    // [1, 16, 1, h, w]; mask_latent [1, 1, 1, h, w]. Shapes other than the packages' throw std::invalid_argument
    // (the packages themselves do not check their inputs).
    void start_clip(const torch::Tensor &text_context, const torch::Tensor &audio_emb, const torch::Tensor &ref_latent,
                    const torch::Tensor &mask_latent);
    // the next chunk: masked video, reference sequence, initial noise and re-noise, each [1, 16, 3, h, w] (checked)
    ChunkResult run_chunk(const torch::Tensor &masked, const torch::Tensor &ref_sequence, const torch::Tensor &noise,
                          const torch::Tensor &renoise);
    // frames before `start` that a chunk starting there attends to (window order)
    std::vector<int> visible_frames(int start) const;

  private:
    // one network call of the current chunk; cache: the visible frames' K and V, window order (empty: none)
    std::vector<torch::Tensor> call(const torch::Tensor &x, double t, const std::vector<torch::Tensor> &cache);
    AotConfig cfg_;
    torch::Device device_;
    std::unique_ptr<torch::inductor::AOTIModelPackageLoader> text_;
    std::map<int, std::unique_ptr<torch::inductor::AOTIModelPackageLoader>> calls_;
    torch::Tensor text_k_, text_v_, audio_, ref_latent_, mask_latent_;
    std::map<int, std::pair<torch::Tensor, torch::Tensor>> cache_;  // absolute frame -> raw K, V [layers, 1, T, H, D]
    int next_frame_ = 0;
};

// A safetensors file's float32 tensors (the golden files' format) and its string metadata.
std::map<std::string, torch::Tensor> read_safetensors(const std::string &path,
                                                      std::map<std::string, std::string> *metadata = nullptr);

double rel_error(const torch::Tensor &out, const torch::Tensor &ref);

}  // namespace lf
