// The memory-bound part of OREPA's online squeeze on the CPU: one pass over the kernel each way.
//
// For one OREPA layer (mmorepa/ops/squeeze.py) these are the branches whose kernel costs
// O(C^2 k^2): kxk, the 1x1 branches followed by a fixed per-output-channel filter (1x1: the centre
// tap, 1x1-avg: 1/k^2, 1x1-freq: the frequency prior) and dw-pw (Sec. 3.5, Eq. 3). Written with
// torch's operators each branch is a pass of its own (scale, broadcast, batched product, layout
// change, accumulate) and its backward several more. Here every tap of the squeezed kernel is
// formed from its branches in registers and written once (Eq. 4 with the scaling of Sec. 3.2), and
// the backward reads the kernel's gradient once. The 1x1-kxk pair (O(C^3 k^2), a matrix product)
// stays with torch. The math is that of the branches' accumulate and backward in
// mmorepa/ops/branches.py; tests/test_squeeze.py checks this file against autograd through
// mmorepa.ops.squeeze.squeezed_kernel_reference in float64.
//
// Layouts (all contiguous): the kernel and its gradient (C_out, C_in/g, P), P = k * k taps (the
// gradient may also come as (C_out, P, C_in/g), its channels-last layout); kxk
// (C_out, C_in/g, P); each fixed-filter 1x1 (C_out, C_in/g); filters (n_fixed, C_out, P); dw
// (C_in * M, P); pw (C_out, C_in/g * M); scales (n_rows, C_out), rows: kxk (if given), the
// fixed-filter branches in order, dw-pw (if given).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kMaxTaps = 121;  // k <= 11
constexpr int64_t kMaxFixed = 4;   // fixed-filter 1x1 branches (OREPA has three kinds)
constexpr int64_t kMaxExpansion = 64;  // dw-pw's depthwise channels per input channel

struct Shape {
    int64_t c_out, cig, og, taps, m, n_fixed;
    bool has_kxk, has_dwpw, has_pair;
    bool taps_outer = false;  // the backward's gradient laid out (C_out, P, C_in/g)
    int64_t row_dw() const { return (has_kxk ? 1 : 0) + n_fixed; }
    int64_t row_pair() const { return row_dw() + (has_dwpw ? 1 : 0); }
    int64_t row_fixed(int64_t b) const { return (has_kxk ? 1 : 0) + b; }
};

// The branches' tensors (nullptr where absent) and, for the backward, their gradients (nullptr
// where not needed).
template <typename T>
struct Operands {
    const T* scales = nullptr;
    const T* kxk = nullptr;
    const T* fixed[kMaxFixed] = {};
    const T* filters = nullptr;
    const T* dw = nullptr;  // forward: (C_in * M, P); backward: (C_in, P, M)
    const T* pw = nullptr;
    const T* pair = nullptr;  // forward: the pair's unscaled kernel (may be the output itself)
    const T* grad = nullptr;
    T* d_kxk = nullptr;
    T* d_fixed[kMaxFixed] = {};
    T* d_dw = nullptr;  // (C_in, P, M), accumulated
    T* d_pw = nullptr;
};

// K[o, i, :] for the input channels [i0, i1) of every output channel. PC: the taps when known at
// compile time (the loops over taps unroll and vectorise), else 0. With the pair's kernel
// (has_pair; it may be out itself), its scaled value is added to each tap before it is written.
template <typename T, int PC>
inline void forward_range(const Shape& sh, const Operands<T>& in, int64_t i0, int64_t i1, T* out) {
    const int64_t P = PC > 0 ? PC : sh.taps;
    const int64_t cig = sh.cig, M = sh.m, nf = sh.n_fixed, C = sh.c_out;
    T acc[PC > 0 ? PC : kMaxTaps];
    T part[PC > 0 ? PC : kMaxTaps];
    for (int64_t o = 0; o < C; ++o) {
        const int64_t grp = o / sh.og;
        const T sk = sh.has_kxk ? in.scales[o] : T(0);
        const T sd = sh.has_dwpw ? in.scales[sh.row_dw() * C + o] : T(0);
        const T sp = sh.has_pair ? in.scales[sh.row_pair() * C + o] : T(0);
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t oi = o * cig + i;
            for (int64_t p = 0; p < P; ++p) acc[p] = sh.has_kxk ? sk * in.kxk[oi * P + p] : T(0);
            if (sh.has_pair)
                for (int64_t p = 0; p < P; ++p) acc[p] += sp * in.pair[oi * P + p];
            for (int64_t b = 0; b < nf; ++b) {
                const T a = in.scales[sh.row_fixed(b) * C + o] * in.fixed[b][oi];
                const T* f = in.filters + (b * C + o) * P;
                for (int64_t p = 0; p < P; ++p) acc[p] += a * f[p];
            }
            if (sh.has_dwpw) {
                const T* pwr = in.pw + oi * M;
                const T* dwr = in.dw + (grp * cig + i) * M * P;
                for (int64_t p = 0; p < P; ++p) part[p] = T(0);
                for (int64_t j = 0; j < M; ++j)
                    for (int64_t p = 0; p < P; ++p) part[p] += pwr[j] * dwr[j * P + p];
                for (int64_t p = 0; p < P; ++p) acc[p] += sd * part[p];
            }
            std::memcpy(out + oi * P, acc, P * sizeof(T));
        }
    }
}

template <typename V, typename T>
inline V vload(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
}
template <typename V, typename T>
inline void vstore(T* p, V v) {
    std::memcpy(p, &v, sizeof(V));
}

// ``sum(g * w)`` over n contiguous elements (four partial sums in 32-byte vectors, one fixed
// order) and, when out is given, ``out = s * g``: the kxk branch's scale gradient and weight
// gradient for a stretch of one output channel.
template <typename T>
inline T dot_and_scale(const T* g, const T* w, int64_t n, T s, T* out) {
    typedef T V __attribute__((vector_size(32)));
    constexpr int64_t L = 32 / sizeof(T);
    V acc[4] = {};
    int64_t j = 0;
    for (; j + 4 * L <= n; j += 4 * L) {
        for (int u = 0; u < 4; ++u) {
            const V gv = vload<V>(g + j + u * L);
            acc[u] += gv * vload<V>(w + j + u * L);
            if (out) vstore(out + j + u * L, s * gv);
        }
    }
    const V sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    T r = 0;
    for (int64_t l = 0; l < L; ++l) r += sum[l];
    for (; j < n; ++j) {
        r += g[j] * w[j];
        if (out) out[j] = s * g[j];
    }
    return r;
}

// dw-pw's backward at one (o, i): ``t[m] = sum_p g[p] dw[i, m, p]``, ``d_pw = s t``, the scale's
// partial sum ``ds += t * pw`` and ``d_dw[i, m, p] += s pw[m] g[p]``, written across the M
// depthwise channels (dw and d_dw as (P, M) per input channel), never along a sum. MC: M when it
// is a vector width (8 or 16), else 0 (scalar loops).
template <typename T, int MC>
struct DwPwBackward {
    static constexpr int64_t kLanes = MC > 0 ? MC : kMaxExpansion;
    T ds[kLanes];
    void reset(int64_t M) { std::fill(ds, ds + M, T(0)); }
    T sum(int64_t M) const {
        T s = 0;
        for (int64_t j = 0; j < M; ++j) s += ds[j];
        return s;
    }
    inline void step(int64_t P, int64_t M, const T* g, const T* dwt, const T* pwr, T s, T* d_pw,
                     T* d_dwt) {
        if constexpr (MC > 0) {
            typedef T V __attribute__((vector_size(sizeof(T) * MC)));
            auto load = [](const T* p) { return vload<V>(p); };
            auto store = [](T* p, V v) { vstore(p, v); };
            V t = {};
            for (int64_t p = 0; p < P; ++p) t += g[p] * load(dwt + p * MC);
            const V w = load(pwr);
            store(ds, load(ds) + t * w);
            if (d_pw) store(d_pw, s * t);
            if (d_dwt) {
                const V a = s * w;
                for (int64_t p = 0; p < P; ++p) store(d_dwt + p * MC, load(d_dwt + p * MC) + g[p] * a);
            }
        } else {
            for (int64_t j = 0; j < M; ++j) {
                T t = 0;
                for (int64_t p = 0; p < P; ++p) t += g[p] * dwt[p * M + j];
                ds[j] += t * pwr[j];
                if (d_pw) d_pw[j] = s * t;
                if (d_dwt)
                    for (int64_t p = 0; p < P; ++p) d_dwt[p * M + j] += s * pwr[j] * g[p];
            }
        }
    }
};

// The gradients for the input channels [i0, i1) (the formulas: each branch's backward in
// mmorepa/ops/branches.py), one read of each gradient tap; the scales' gradients of this range
// are added into ds (n_rows, C_out), a buffer of this thread.
template <typename T, int PC, int MC>
inline void backward_range(const Shape& sh, const Operands<T>& in, int64_t i0, int64_t i1, T* ds) {
    const int64_t P = PC > 0 ? PC : sh.taps;
    const int64_t cig = sh.cig, M = sh.m, nf = sh.n_fixed, C = sh.c_out;
    T ft[(PC > 0 ? PC : kMaxTaps) * kMaxFixed];  // the filters of output channel o, (P, 4)
    DwPwBackward<T, MC> dwpw;
    for (int64_t o = 0; o < C; ++o) {
        const int64_t grp = o / sh.og;
        const T sk = sh.has_kxk ? in.scales[o] : T(0);
        const T sd = sh.has_dwpw ? in.scales[sh.row_dw() * C + o] : T(0);
        T sf[kMaxFixed], dsf[kMaxFixed] = {};
        for (int64_t b = 0; b < kMaxFixed; ++b) {
            sf[b] = b < nf ? in.scales[sh.row_fixed(b) * C + o] : T(0);
            for (int64_t p = 0; p < P; ++p)
                ft[p * kMaxFixed + b] = b < nf ? in.filters[(b * C + o) * P + p] : T(0);
        }
        if (sh.has_kxk && !sh.taps_outer) {  // the kxk branch over the row segment at once
            const int64_t at = (o * cig + i0) * P;
            ds[o] += dot_and_scale(in.grad + at, in.kxk + at, (i1 - i0) * P, sk,
                                   in.d_kxk ? in.d_kxk + at : nullptr);
        }
        dwpw.reset(M);
        T gathered[PC > 0 ? PC : kMaxTaps];
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t oi = o * cig + i;
            const T* g = in.grad + oi * P;
            if (sh.taps_outer) {  // grad laid out (C_out, P, C_in/g): this (o, i)'s taps
                for (int64_t p = 0; p < P; ++p) gathered[p] = in.grad[(o * P + p) * cig + i];
                g = gathered;
                if (sh.has_kxk)
                    ds[o] += dot_and_scale(g, in.kxk + oi * P, P, sk,
                                           in.d_kxk ? in.d_kxk + oi * P : nullptr);
            }
            if (nf) {
                T h[kMaxFixed] = {};
                for (int64_t p = 0; p < P; ++p)
                    for (int64_t b = 0; b < kMaxFixed; ++b) h[b] += g[p] * ft[p * kMaxFixed + b];
                for (int64_t b = 0; b < nf; ++b) {
                    dsf[b] += h[b] * in.fixed[b][oi];
                    if (in.d_fixed[b]) in.d_fixed[b][oi] = sf[b] * h[b];
                }
            }
            if (sh.has_dwpw) {
                const int64_t ig = grp * cig + i;
                dwpw.step(P, M, g, in.dw + ig * P * M, in.pw + oi * M, sd,
                          in.d_pw ? in.d_pw + oi * M : nullptr,
                          in.d_dw ? in.d_dw + ig * P * M : nullptr);
            }
        }
        for (int64_t b = 0; b < nf; ++b) ds[sh.row_fixed(b) * C + o] += dsf[b];
        if (sh.has_dwpw) ds[sh.row_dw() * C + o] += dwpw.sum(M);
    }
}

// Each range function twice: as compiled (the baseline ISA) and, on x86, with AVX2 and FMA
// (everything it calls inlined into it), chosen once at run time by what the CPU supports.
#if defined(__GNUC__) && defined(__x86_64__)
#define MMOREPA_AVX2 1
template <typename T, int PC>
__attribute__((target("avx2,fma"), flatten)) void forward_range_avx2(
    const Shape& sh, const Operands<T>& in, int64_t i0, int64_t i1, T* out) {
    forward_range<T, PC>(sh, in, i0, i1, out);
}
template <typename T, int PC, int MC>
__attribute__((target("avx2,fma"), flatten)) void backward_range_avx2(
    const Shape& sh, const Operands<T>& in, int64_t i0, int64_t i1, T* ds) {
    backward_range<T, PC, MC>(sh, in, i0, i1, ds);
}
bool cpu_has_avx2() {
    static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return yes;
}
#endif

template <typename T, int PC>
__attribute__((flatten)) void forward_range_base(const Shape& sh, const Operands<T>& in,
                                                 int64_t i0, int64_t i1, T* out) {
    forward_range<T, PC>(sh, in, i0, i1, out);
}
template <typename T, int PC, int MC>
__attribute__((flatten)) void backward_range_base(const Shape& sh, const Operands<T>& in,
                                                  int64_t i0, int64_t i1, T* ds) {
    backward_range<T, PC, MC>(sh, in, i0, i1, ds);
}

// The taps and the depthwise expansion as compile-time constants where they are common.
template <typename F>
void by_taps(int64_t taps, F&& f) {
    switch (taps) {
        case 1: f(std::integral_constant<int, 1>{}); break;
        case 9: f(std::integral_constant<int, 9>{}); break;
        case 25: f(std::integral_constant<int, 25>{}); break;
        case 49: f(std::integral_constant<int, 49>{}); break;
        default: f(std::integral_constant<int, 0>{}); break;
    }
}
template <typename F>
void by_expansion(int64_t m, F&& f) {
    switch (m) {
        case 8: f(std::integral_constant<int, 8>{}); break;
        case 16: f(std::integral_constant<int, 16>{}); break;
        default: f(std::integral_constant<int, 0>{}); break;
    }
}

// The threads share the input channels, so that dw-pw's depthwise gradient (a sum over output
// channels) has one writer per element.
int64_t grain_of(const Shape& sh) {
    return std::max<int64_t>(1, (sh.cig + at::get_num_threads() - 1) / at::get_num_threads());
}

template <typename T>
const T* ptr(const c10::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

Shape check_inputs(const at::Tensor& scales, const c10::optional<at::Tensor>& kxk,
                   const std::vector<at::Tensor>& fixed, const at::Tensor& filters,
                   const c10::optional<at::Tensor>& dw, const c10::optional<at::Tensor>& pw,
                   const c10::optional<at::Tensor>& pair, int64_t c_out, int64_t cig,
                   int64_t groups, int64_t taps) {
    auto check = [&](const at::Tensor& t, const char* name, int64_t numel) {
        TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() &&
                        t.scalar_type() == scales.scalar_type() && t.numel() == numel,
                    "squeeze_cpu: ", name, " must be a contiguous CPU tensor of the scales' dtype "
                    "with ", numel, " elements");
    };
    const int64_t nf = fixed.size();
    TORCH_CHECK(taps >= 1 && taps <= kMaxTaps, "squeeze_cpu: unsupported number of taps ", taps);
    TORCH_CHECK(groups >= 1 && c_out % groups == 0, "squeeze_cpu: bad groups ", groups);
    TORCH_CHECK(nf <= kMaxFixed, "squeeze_cpu: at most ", kMaxFixed, " fixed-filter branches");
    TORCH_CHECK(dw.has_value() == pw.has_value(), "squeeze_cpu: dw and pw go together");
    const bool has_kxk = kxk.has_value(), has_dwpw = dw.has_value(), has_pair = pair.has_value();
    const int64_t rows = (has_kxk ? 1 : 0) + nf + (has_dwpw ? 1 : 0) + (has_pair ? 1 : 0);
    check(scales, "scales", rows * c_out);
    if (has_kxk) check(*kxk, "kxk", c_out * cig * taps);
    if (has_pair) check(*pair, "the pair's kernel", c_out * cig * taps);
    for (const auto& t : fixed) check(t, "a fixed-filter 1x1", c_out * cig);
    if (nf) check(filters, "filters", nf * c_out * taps);
    int64_t m = 1;
    if (has_dwpw) {
        m = dw->numel() / (cig * groups * taps);
        TORCH_CHECK(m >= 1 && m <= kMaxExpansion, "squeeze_cpu: dw-pw expansion ", m,
                    " outside 1..", kMaxExpansion);
        check(*dw, "dw", cig * groups * m * taps);
        check(*pw, "pw", c_out * cig * m);
    }
    return Shape{c_out, cig, c_out / groups, taps, m, nf, has_kxk, has_dwpw, has_pair};
}

}  // namespace

// The sum of the scaled kernels of the given branches, (C_out, C_in/g, P). pair: the unscaled
// kernel of the 1x1-kxk pair (composed by torch), scaled by the last row of scales; the sum is
// written over it and returned (no other kernel-sized buffer).
at::Tensor squeeze_forward(at::Tensor scales, c10::optional<at::Tensor> kxk,
                           std::vector<at::Tensor> fixed, at::Tensor filters,
                           c10::optional<at::Tensor> dw, c10::optional<at::Tensor> pw,
                           c10::optional<at::Tensor> pair, int64_t c_out, int64_t cig,
                           int64_t groups, int64_t taps) {
    const Shape sh = check_inputs(scales, kxk, fixed, filters, dw, pw, pair, c_out, cig, groups,
                                  taps);
    at::Tensor out = sh.has_pair ? *pair : at::empty({c_out, cig, taps}, scales.options());
    AT_DISPATCH_FLOATING_TYPES(scales.scalar_type(), "squeeze_forward", [&] {
        using T = scalar_t;
        Operands<T> in;
        in.scales = scales.data_ptr<T>();
        in.kxk = ptr<T>(kxk);
        for (size_t b = 0; b < fixed.size(); ++b) in.fixed[b] = fixed[b].data_ptr<T>();
        in.filters = fixed.empty() ? nullptr : filters.data_ptr<T>();
        in.dw = ptr<T>(dw);
        in.pw = ptr<T>(pw);
        in.pair = ptr<T>(pair);
        T* y = out.data_ptr<T>();
        by_taps(taps, [&](auto pc) {
            auto range = &forward_range_base<T, decltype(pc)::value>;
#ifdef MMOREPA_AVX2
            if (cpu_has_avx2()) range = &forward_range_avx2<T, decltype(pc)::value>;
#endif
            at::parallel_for(0, sh.cig, grain_of(sh), [&](int64_t i0, int64_t i1) {
                range(sh, in, i0, i1, y);
            });
        });
    });
    return out;
}

// The gradients for grad (C_out, C_in/g, P), or (C_out, P, C_in/g) when taps_outer (the
// channels-last layout of a kernel's gradient: channels-last models, torch.compile on the CPU,
// whose conv weight gradients come out so): [d_scales (n_rows, C_out),
// d_kxk, d_fixed..., d_dw, d_pw], an undefined tensor for a branch that is absent or not needed.
// needs: one flag per leaf present, in that order (kxk, the fixed-filter 1x1s, dw, pw).
std::vector<at::Tensor> squeeze_backward(at::Tensor grad, at::Tensor scales,
                                         c10::optional<at::Tensor> kxk,
                                         std::vector<at::Tensor> fixed, at::Tensor filters,
                                         c10::optional<at::Tensor> dw,
                                         c10::optional<at::Tensor> pw, int64_t groups,
                                         std::vector<bool> needs, bool taps_outer) {
    TORCH_CHECK(grad.dim() == 3, "squeeze_cpu: grad must be (C_out, C_in/g, P) or, taps_outer, "
                "(C_out, P, C_in/g)");
    const int64_t cig = grad.size(taps_outer ? 2 : 1), taps = grad.size(taps_outer ? 1 : 2);
    Shape sh = check_inputs(scales, kxk, fixed, filters, dw, pw, c10::nullopt, grad.size(0), cig,
                            groups, taps);
    sh.taps_outer = taps_outer;
    TORCH_CHECK(grad.is_contiguous() && grad.scalar_type() == scales.scalar_type(),
                "squeeze_cpu: grad must be contiguous, of the scales' dtype");
    TORCH_CHECK((int64_t)needs.size() == (sh.has_kxk ? 1 : 0) + sh.n_fixed + (sh.has_dwpw ? 2 : 0),
                "squeeze_cpu: needs does not match the branches");
    size_t next = 0;
    at::Tensor d_kxk, d_dw, d_pw, dwt, d_dwt;
    std::vector<at::Tensor> d_fixed(sh.n_fixed);
    if (sh.has_kxk && needs[next++]) d_kxk = at::empty_like(*kxk);
    for (int64_t b = 0; b < sh.n_fixed; ++b)
        if (needs[next++]) d_fixed[b] = at::empty_like(fixed[b]);
    if (sh.has_dwpw) {
        dwt = dw->view({-1, sh.m, sh.taps}).transpose(1, 2).contiguous();  // (C_in, P, M)
        if (needs[next++]) d_dwt = at::zeros_like(dwt);
        if (needs[next++]) d_pw = at::empty_like(*pw);
    }
    const int64_t n_threads = std::max<int64_t>(1, at::get_num_threads());
    at::Tensor ds_threads = at::zeros({n_threads, scales.size(0), sh.c_out}, scales.options());
    AT_DISPATCH_FLOATING_TYPES(scales.scalar_type(), "squeeze_backward", [&] {
        using T = scalar_t;
        Operands<T> in;
        in.scales = scales.data_ptr<T>();
        in.kxk = ptr<T>(kxk);
        for (int64_t b = 0; b < sh.n_fixed; ++b) {
            in.fixed[b] = fixed[b].data_ptr<T>();
            in.d_fixed[b] = d_fixed[b].defined() ? d_fixed[b].data_ptr<T>() : nullptr;
        }
        in.filters = sh.n_fixed ? filters.data_ptr<T>() : nullptr;
        in.dw = dwt.defined() ? dwt.data_ptr<T>() : nullptr;
        in.pw = ptr<T>(pw);
        in.grad = grad.data_ptr<T>();
        in.d_kxk = d_kxk.defined() ? d_kxk.data_ptr<T>() : nullptr;
        in.d_dw = d_dwt.defined() ? d_dwt.data_ptr<T>() : nullptr;
        in.d_pw = d_pw.defined() ? d_pw.data_ptr<T>() : nullptr;
        T* dsb = ds_threads.data_ptr<T>();
        const int64_t ds_size = scales.size(0) * sh.c_out;
        by_taps(sh.taps, [&](auto pc) {
            by_expansion(sh.m, [&](auto mc) {
                constexpr int PC = decltype(pc)::value, MC = decltype(mc)::value;
                auto range = &backward_range_base<T, PC, MC>;
#ifdef MMOREPA_AVX2
                if (cpu_has_avx2()) range = &backward_range_avx2<T, PC, MC>;
#endif
                at::parallel_for(0, sh.cig, grain_of(sh), [&](int64_t i0, int64_t i1) {
                    const int64_t t = std::min<int64_t>(at::get_thread_num(), n_threads - 1);
                    range(sh, in, i0, i1, dsb + t * ds_size);
                });
            });
        });
    });
    if (d_dwt.defined()) d_dw = d_dwt.transpose(1, 2).contiguous().view_as(*dw);
    std::vector<at::Tensor> result{ds_threads.sum(0), d_kxk};
    for (auto& t : d_fixed) result.push_back(t);
    result.push_back(d_dw);
    result.push_back(d_pw);
    return result;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
    mod.def("squeeze_forward", &squeeze_forward,
            "OREPA's squeeze of the kxk, fixed-filter 1x1 and dw-pw branches in one pass (CPU)");
    mod.def("squeeze_backward", &squeeze_backward,
            "the gradients of squeeze_forward, one pass over the kernel's gradient (CPU)");
    // the sizes it takes (mmorepa/ops/squeeze.py leaves larger ones to torch's operators)
    mod.attr("MAX_TAPS") = kMaxTaps;
    mod.attr("MAX_EXPANSION") = kMaxExpansion;
}
