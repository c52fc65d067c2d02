#include "lf_student.h"

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace lf {
namespace {

std::string slurp(const std::string &path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error(path + ": cannot be read");
    std::stringstream buffer;
    buffer << in.rdbuf();
    return buffer.str();
}

// The text after `"key":` in a flat JSON object (aot.json and safetensors headers are written by known writers).
size_t value_at(const std::string &json, const std::string &key, size_t from = 0) {
    size_t at = json.find("\"" + key + "\"", from);
    if (at == std::string::npos) throw std::runtime_error("missing \"" + key + "\"");
    at = json.find(':', at);
    return json.find_first_not_of(" \n\t", at + 1);
}

double number(const std::string &json, const std::string &key) { return std::stod(json.substr(value_at(json, key))); }

std::vector<double> numbers(const std::string &json, size_t at) {  // a [a, b, ...] array starting at `at`
    std::vector<double> out;
    size_t end = json.find(']', at);
    std::string body = json.substr(at + 1, end - at - 1);
    std::stringstream items(body);
    std::string item;
    while (std::getline(items, item, ','))
        if (item.find_first_not_of(" \n\t") != std::string::npos) out.push_back(std::stod(item));
    return out;
}

std::string shape_text(c10::IntArrayRef sizes) {
    std::string out = "[";
    for (size_t i = 0; i < sizes.size(); i++) out += (i ? ", " : "") + std::to_string(sizes[i]);
    return out + "]";
}

// `tensor` must have the shape `want` (-1: any size): the compiled packages read out of bounds otherwise.
void expect_shape(const torch::Tensor &tensor, const std::vector<int64_t> &want, const char *name) {
    bool ok = tensor.dim() == (int64_t)want.size();
    for (size_t i = 0; ok && i < want.size(); i++) ok = want[i] < 0 || tensor.size((int64_t)i) == want[i];
    if (!ok)
        throw std::invalid_argument(std::string(name) + " has shape " + shape_text(tensor.sizes()) +
                                    ", the packages were compiled for " + shape_text(want) + " (-1: any)");
}

}  // namespace

AotConfig AotConfig::read(const std::string &path) {
    std::string json = slurp(path);
    if (json.find("lipforcing-aot/1") == std::string::npos) throw std::runtime_error(path + ": not lipforcing-aot/1");
    AotConfig c;
    c.layers = (int)number(json, "layers");
    c.heads = (int)number(json, "heads");
    c.head_dim = (int)number(json, "head_dim");
    c.tokens_per_frame = (int)number(json, "tokens_per_frame");
    c.chunk_frames = (int)number(json, "chunk_frames");
    c.sink_frames = (int)number(json, "sink_frames");
    c.window_frames = (int)number(json, "window_frames");
    c.audio_dim = (int)number(json, "audio_dim");
    c.latent_h = (int)number(json, "latent_h");
    c.latent_w = (int)number(json, "latent_w");
    c.text_len = (int)number(json, "text_len");
    c.text_dim = (int)number(json, "text_dim");
    c.t_list = numbers(json, value_at(json, "t_list"));
    c.commit_t = number(json, "commit_t");
    for (size_t at = json.find("\"cached_frames\""); at != std::string::npos;
         at = json.find("\"cached_frames\"", at + 1))
        c.shapes.push_back(std::stoi(json.substr(value_at(json, "cached_frames", at))));
    if (c.t_list.size() != 2) throw std::runtime_error(path + ": the C++ student runs the 2-step schedule");
    return c;
}

Student::Student(const std::string &dir, const std::string &device) : device_(device) {
    cfg_ = AotConfig::read(dir + "/aot.json");
    text_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(dir + "/text.pt2");
    for (int cached : cfg_.shapes)
        calls_[cached] = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
            dir + "/call_c" + std::to_string(cached) + ".pt2");
}

Student::~Student() = default;

std::vector<int> Student::visible_frames(int start) const {
    const int sink = cfg_.sink_frames, chunk = cfg_.chunk_frames, rolling = cfg_.window_frames - sink;
    std::vector<int> out;
    for (int f = 0; f < std::min(sink, start); f++) out.push_back(f);
    int chunk_rolling = chunk - std::max(0, std::min(sink, start + chunk) - start);
    for (int f = std::max(sink, start - (rolling - chunk_rolling)); f < start; f++) out.push_back(f);
    return out;
}

void Student::start_clip(const torch::Tensor &text_context, const torch::Tensor &audio_emb,
                         const torch::Tensor &ref_latent, const torch::Tensor &mask_latent) {
    const int64_t h = cfg_.latent_h, w = cfg_.latent_w;
    expect_shape(text_context, {1, cfg_.text_len, cfg_.text_dim}, "text_context");
    expect_shape(audio_emb, {1, -1, cfg_.audio_dim}, "audio_emb");
    expect_shape(ref_latent, {1, 16, 1, h, w}, "ref_latent");
    expect_shape(mask_latent, {1, 1, 1, h, w}, "mask_latent");
    std::vector<torch::Tensor> in{text_context.to(device_, torch::kFloat32).contiguous()};
    auto kv = text_->run(in);
    text_k_ = kv.at(0);
    text_v_ = kv.at(1);
    audio_ = audio_emb.to(device_, torch::kFloat32);
    ref_latent_ = ref_latent.to(device_, torch::kFloat32);
    mask_latent_ = mask_latent.to(device_, torch::kFloat32);
    cache_.clear();
    next_frame_ = 0;
}

std::vector<torch::Tensor> Student::call(const torch::Tensor &x_in, double t, const std::vector<torch::Tensor> &cache) {
    const int c = cfg_.chunk_frames, s = next_frame_;
    // the chunk's video-frame audio: latent k sees frames 4k-3 .. 4k (frame 0 repeated before the clip)
    torch::Tensor audio = s == 0 ? audio_.narrow(1, 0, 1 + 4 * (c - 1)) : audio_.narrow(1, 4 * s - 3, 4 * c);
    std::vector<torch::Tensor> in{x_in.contiguous(), torch::full({1}, t, torch::dtype(torch::kFloat64).device(device_)),
                                  audio.contiguous(), text_k_, text_v_};
    in.insert(in.end(), cache.begin(), cache.end());
    const int cached = cache.empty() ? 0 : (int)(cache[0].size(2) / cfg_.tokens_per_frame);
    auto found = calls_.find(cached);
    if (found == calls_.end())
        throw std::runtime_error("no package for a window of " + std::to_string(cached) + " cached frames");
    return found->second->run(in);
}

ChunkResult Student::run_chunk(const torch::Tensor &masked, const torch::Tensor &ref_sequence,
                               const torch::Tensor &noise, const torch::Tensor &renoise) {
    const int c = cfg_.chunk_frames, s = next_frame_, tokens = cfg_.tokens_per_frame;
    const std::vector<int64_t> chunk{1, 16, c, cfg_.latent_h, cfg_.latent_w};
    expect_shape(masked, chunk, "masked_video");
    expect_shape(ref_sequence, chunk, "ref_sequence");
    expect_shape(noise, chunk, "noise");
    expect_shape(renoise, chunk, "renoise");
    const int64_t audio_needed = s == 0 ? 1 + 4 * (c - 1) : 4 * s - 3 + 4 * c;
    if (audio_.size(1) < audio_needed)
        throw std::invalid_argument("audio_emb has " + std::to_string(audio_.size(1)) + " frames, chunk " +
                                    std::to_string(s / c) + " needs " + std::to_string(audio_needed));
    const double t0 = cfg_.t_list[0], t1 = cfg_.t_list[1];
    auto inputs = [&](const torch::Tensor &x) {  // the 65 channels (SPEC §3)
        return torch::cat({x, ref_latent_.expand({-1, -1, c, -1, -1}), mask_latent_.expand({-1, -1, c, -1, -1}),
                           masked.to(device_, torch::kFloat32), ref_sequence.to(device_, torch::kFloat32)},
                          1);
    };
    std::vector<torch::Tensor> cache;  // the visible frames' K/V, gathered once for the chunk's three calls
    std::vector<int> visible = visible_frames(s);
    if (!visible.empty()) {
        std::vector<torch::Tensor> ks, vs;
        for (int f : visible) {
            ks.push_back(cache_.at(f).first);
            vs.push_back(cache_.at(f).second);
        }
        cache = {torch::cat(ks, 2).contiguous(), torch::cat(vs, 2).contiguous()};
    }
    torch::Tensor x = noise.to(device_, torch::kFloat32);
    ChunkResult out;
    out.first_flow = call(inputs(x), t0, cache).at(0);
    out.x0_step0 = (x.to(torch::kFloat64) - t0 * out.first_flow.to(torch::kFloat64)).to(torch::kFloat32);
    x = ((1 - t1) * out.x0_step0.to(torch::kFloat64) + t1 * renoise.to(device_, torch::kFloat64)).to(torch::kFloat32);
    torch::Tensor flow = call(inputs(x), t1, cache).at(0);
    out.x0 = (x.to(torch::kFloat64) - t1 * flow.to(torch::kFloat64)).to(torch::kFloat32);
    auto commit = call(inputs(out.x0), cfg_.commit_t, cache);  // the chunk's raw K/V for later chunks
    std::vector<int> after = visible_frames(s + c);
    std::map<int, std::pair<torch::Tensor, torch::Tensor>> kept;
    for (int f : after) {
        if (f < s) kept[f] = cache_.at(f);
        else kept[f] = {commit.at(1).narrow(2, (f - s) * tokens, tokens).clone(),
                        commit.at(2).narrow(2, (f - s) * tokens, tokens).clone()};
    }
    cache_ = std::move(kept);
    next_frame_ = s + c;
    return out;
}

std::map<std::string, torch::Tensor> read_safetensors(const std::string &path,
                                                      std::map<std::string, std::string> *metadata) {
    std::string data = slurp(path);
    if (data.size() < 8) throw std::runtime_error(path + ": not a safetensors file");
    uint64_t header_size = 0;
    std::memcpy(&header_size, data.data(), 8);  // little-endian, as the hosts this builds for
    if (header_size > data.size() - 8) throw std::runtime_error(path + ": not a safetensors file");
    std::string header = data.substr(8, header_size);
    const char *base = data.data() + 8 + header_size;
    std::map<std::string, torch::Tensor> out;
    size_t at = 0;
    while ((at = header.find("\"data_offsets\"", at)) != std::string::npos) {
        size_t open = header.rfind('{', at);
        size_t name_end = header.rfind('"', header.rfind(':', open));
        size_t name_start = header.rfind('"', name_end - 1);
        std::string name = header.substr(name_start + 1, name_end - name_start - 1);
        size_t close = header.find('}', at);
        std::string entry = header.substr(open, close - open + 1);
        if (entry.find("\"F32\"") == std::string::npos) throw std::runtime_error(path + ": " + name + " is not F32");
        std::vector<double> shape = numbers(entry, value_at(entry, "shape"));
        std::vector<double> offsets = numbers(entry, value_at(entry, "data_offsets"));
        std::vector<int64_t> sizes(shape.begin(), shape.end());
        auto tensor = torch::empty(sizes, torch::kFloat32);
        size_t bytes = (size_t)(offsets.at(1) - offsets.at(0));
        if (bytes != (size_t)tensor.numel() * 4) throw std::runtime_error(path + ": " + name + " has a bad size");
        std::memcpy(tensor.data_ptr(), base + (size_t)offsets.at(0), bytes);
        out[name] = tensor;
        at = close;
    }
    if (metadata) {
        size_t meta = header.find("\"__metadata__\"");
        if (meta != std::string::npos) {
            size_t format = header.find("\"format\"", meta);
            if (format != std::string::npos) {
                size_t q1 = header.find('"', header.find(':', format) + 1);
                (*metadata)["format"] = header.substr(q1 + 1, header.find('"', q1 + 1) - q1 - 1);
            }
        }
    }
    return out;
}

double rel_error(const torch::Tensor &out, const torch::Tensor &ref) {
    auto o = out.detach().to(torch::kCPU, torch::kFloat64), r = ref.detach().to(torch::kCPU, torch::kFloat64);
    return ((o - r).norm() / r.norm().clamp_min(1e-30)).item<double>();
}

}  // namespace lf
