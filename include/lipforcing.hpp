// lipforcing.hpp: header-only C++17 RAII over the C ABI (lipforcing.h). Errors are exceptions carrying the
// status; handles (Engine, Session) are freed by destructors; a popped frame owns its pixels.
//
//     lipforcing::Config config;                 // lf_config_init'ed
//     config.model = "tiny";
//     lipforcing::Session session(config);       // throws lipforcing::Error (status(), what())
//     session.push_speech(samples, n, 16000);
//     session.end_speech();
//     session.push_frame(rgb, width, height, width * 3);
//     while (auto frame = session.pop(0)) use(frame->data());   // nothing ready: an empty optional
//     session.close();
//     while (auto frame = session.pop(-1)) use(frame->data());  // until the end (session.status(): LF_END)
#ifndef LIPFORCING_HPP
#define LIPFORCING_HPP

#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>

#include "lipforcing.h"

namespace lipforcing {

class Error : public std::runtime_error {
  public:
    Error(int status, const std::string &message)
        : std::runtime_error(std::string(lf_status_name(status)) + ": " + message), status_(status) {}
    int status() const noexcept { return status_; }

  private:
    int status_;
};

// A failed status as an Error with this thread's message; the others (LF_OK, LF_END, ...) returned.
inline int check(int status) {
    if (status < 0) throw Error(status, lf_last_error());
    return status;
}

struct Config : lf_config {
    Config() { check(lf_config_init(static_cast<lf_config *>(this))); }
};

class Frame {
  public:
    Frame() = default;
    explicit Frame(const lf_frame &frame) : frame_(frame) {}
    Frame(Frame &&other) noexcept : frame_(std::exchange(other.frame_, lf_frame{})) {}
    Frame &operator=(Frame &&other) noexcept {
        if (this != &other) {
            lf_frame_release(&frame_);
            frame_ = std::exchange(other.frame_, lf_frame{});
        }
        return *this;
    }
    Frame(const Frame &) = delete;
    Frame &operator=(const Frame &) = delete;
    ~Frame() { lf_frame_release(&frame_); }
    const uint8_t *data() const { return frame_.data; }
    int width() const { return frame_.width; }
    int height() const { return frame_.height; }
    size_t stride() const { return frame_.stride; }
    int64_t index() const { return frame_.index; }

  private:
    lf_frame frame_{};
};

class Engine;

class Session {
  public:
    explicit Session(const lf_config &config) { check(lf_create(&config, &session_)); }
    // A session on `engine` (options: live and lookahead; nullptr: the whole speech first)
    Session(Engine &engine, const lf_config *options = nullptr);
    Session(Session &&other) noexcept : session_(std::exchange(other.session_, nullptr)), status_(other.status_) {}
    Session &operator=(Session &&other) noexcept {
        if (this != &other) {
            lf_destroy(session_);
            session_ = std::exchange(other.session_, nullptr);
            status_ = other.status_;
        }
        return *this;
    }
    Session(const Session &) = delete;
    Session &operator=(const Session &) = delete;
    ~Session() { lf_destroy(session_); }

    void push_speech(const float *samples, size_t count, int sample_rate) {
        check(lf_push_speech(session_, samples, count, sample_rate));
    }
    void end_speech() { check(lf_end_speech(session_)); }
    void push_frame(const uint8_t *rgb, int width, int height, size_t stride) {
        check(lf_push_frame(session_, rgb, width, height, stride));
    }
    // The next frame, or none (then status() says why: LF_TIMEOUT, LF_END or LF_CANCELLED).
    std::optional<Frame> pop(int timeout_ms) {
        lf_frame frame;
        status_ = check(lf_pop_frame(session_, &frame, timeout_ms));
        if (status_ != LF_OK) return std::nullopt;
        return Frame(frame);
    }
    // The next frame into the caller's buffer (rows of `stride` bytes): true when one was written.
    bool pop_into(uint8_t *buffer, size_t capacity, size_t stride, lf_frame *out, int timeout_ms) {
        status_ = check(lf_pop_frame_into(session_, buffer, capacity, stride, out, timeout_ms));
        return status_ == LF_OK;
    }
    void cancel() { check(lf_cancel(session_)); }
    void close() { check(lf_close(session_)); }
    int status() const { return status_; }  // the last pop's
    lf_session *get() const { return session_; }

  private:
    lf_session *session_ = nullptr;
    int status_ = LF_OK;
};

// An engine of one's own, shared by the sessions made from it (which keep it alive after this handle is gone).
class Engine {
  public:
    explicit Engine(const lf_config &config) { check(lf_engine_create(&config, &engine_)); }
    Engine(Engine &&other) noexcept : engine_(std::exchange(other.engine_, nullptr)) {}
    Engine &operator=(Engine &&other) noexcept {
        if (this != &other) {
            lf_engine_destroy(engine_);
            engine_ = std::exchange(other.engine_, nullptr);
        }
        return *this;
    }
    Engine(const Engine &) = delete;
    Engine &operator=(const Engine &) = delete;
    ~Engine() { lf_engine_destroy(engine_); }
    double warm_up() {
        double seconds = 0;
        check(lf_engine_warm_up(engine_, &seconds));
        return seconds;
    }
    lf_engine *get() const { return engine_; }

  private:
    lf_engine *engine_ = nullptr;
};

inline Session::Session(Engine &engine, const lf_config *options) {
    check(lf_session_create(engine.get(), options, &session_));
}

}  // namespace lipforcing

#endif  // LIPFORCING_HPP
