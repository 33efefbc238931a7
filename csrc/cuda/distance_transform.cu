// CUDA exact Euclidean distance transform: all batch items in one launch per pass.
//   1. rows (contiguous W): one warp per row; the nearest feature on the left / right of every
//      voxel comes from warp prefix-max / suffix-min scans over 32-voxel chunks (carry between
//      chunks), giving the squared distance along the row. Rows up to 512 long (rows_reg_kernel)
//      load a lane's mask bytes up front and keep the left gaps in registers.
//   2. H lines, 3. D lines: one thread per line, the 32 threads of a warp on W-adjacent lines so
//      every global access coalesces. A thread stages its column in shared memory ([pos][thread]
//      layout: consecutive threads hit consecutive banks) with its envelope's vertex indices
//      (uint16), runs the shared envelope (common/distance_transform.h) and writes the result in
//      place; the last pass writes the square root. Lines longer than edt_smem_max_n use the same
//      code with a [pos][line] global workspace instead of shared memory.
//   Those lines (lines_async_kernel) stage the column with cp.async, so all n loads of a thread
//   are in flight at once (a plain staging loop keeps a few loads per thread in flight, too few
//   for DRAM latency at 4-5 warps per SM); the envelope stack keeps each
//   vertex's value next to its index (overwriting the consumed part of the staged column), so
//   pops and advances read the stack without a dependent second load; vertex indices are uint8
//   when n <= 256 (5 bytes per position: 5 blocks per SM instead of 4 at n = 256). Same
//   arithmetic as edt::envelope_1d, so the results are bit-identical to the plain envelope.
#if !defined(COLABX_CUDA_EMULATION)  // tests/cuda_emulation runs this file on host threads
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/distance_transform.h"
#include "cuda/distance_transform.h"
#if !defined(COLABX_CUDA_EMULATION)
#include "cuda/runtime.h"
#endif

namespace colabx::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kBig = 1 << 30;   // "no feature on this side" sentinel for row positions
constexpr int kFar = 1 << 29;   // gaps at least this large mean "none"

// Inclusive warp scans over the lanes: max over lanes 0..lane, min over lanes lane..31.
__device__ __forceinline__ int warp_prefix_max(int val, int lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int y = __shfl_up_sync(kFull, val, off);
    if (lane >= off) val = max(val, y);
  }
  return val;
}

__device__ __forceinline__ int warp_suffix_min(int val, int lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int y = __shfl_down_sync(kFull, val, off);
    if (lane + off < 32) val = min(val, y);
  }
  return val;
}

__global__ void rows_kernel(const uint8_t* __restrict__ mask, float* __restrict__ out,
                            int64_t rows, int w, float sw, bool invert) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t r = warp; r < rows; r += nwarps) {  // warp-uniform loop
    const uint8_t* m = mask + r * w;
    float* o = out + r * w;
    int* gap = reinterpret_cast<int*>(o);  // left gaps parked in the output row
    int carry = -kBig;
    for (int c0 = 0; c0 < w; c0 += 32) {
      const int x = c0 + lane;
      int val = (x < w && edt::is_feature(m[x], invert)) ? x : -kBig;
      val = max(warp_prefix_max(val, lane), carry);
      carry = __shfl_sync(kFull, val, 31);
      if (x < w) gap[x] = x - val;
    }
    carry = kBig;
    for (int c0 = ((w - 1) / 32) * 32; c0 >= 0; c0 -= 32) {
      const int x = c0 + lane;
      int val = (x < w && edt::is_feature(m[x], invert)) ? x : kBig;
      val = min(warp_suffix_min(val, lane), carry);
      carry = __shfl_sync(kFull, val, 0);
      // Same lane wrote gap[x] in the first scan: a same-thread read-after-write.
      if (x < w) o[x] = edt::row_sq_dist(gap[x], val - x, kFar, sw);
    }
  }
}

// Rows of w <= 32 * R: the same two scans and arithmetic as rows_kernel, with a lane's R mask
// bytes loaded up front (R independent loads in flight instead of one dependent chunk at a time)
// and its left gaps kept in registers instead of a round trip through the output row. Chunks at
// or past w hold no feature: they leave the scan carries unchanged and are never written.
template <int R>
__global__ void rows_reg_kernel(const uint8_t* __restrict__ mask, float* __restrict__ out,
                                int64_t rows, int w, float sw, bool invert) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t r = warp; r < rows; r += nwarps) {  // warp-uniform loop
    const uint8_t* m = mask + r * w;
    float* o = out + r * w;
    bool feat[R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int x = i * 32 + lane;
      feat[i] = x < w && edt::is_feature(m[x], invert);
    }
    int gap[R];
    int carry = -kBig;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int x = i * 32 + lane;
      int val = feat[i] ? x : -kBig;
      val = max(warp_prefix_max(val, lane), carry);
      carry = __shfl_sync(kFull, val, 31);
      gap[i] = x - val;
    }
    carry = kBig;
#pragma unroll
    for (int i = R - 1; i >= 0; --i) {
      const int x = i * 32 + lane;
      int val = feat[i] ? x : kBig;
      val = min(warp_suffix_min(val, lane), carry);
      carry = __shfl_sync(kFull, val, 0);
      if (x < w) o[x] = edt::row_sq_dist(gap[i], val - x, kFar, sw);
    }
  }
}

// Envelope of one line whose column sits in shared memory, element q at f[q * nt]; v has room
// for n vertex indices at the same stride. Same decisions and arithmetic as edt::envelope_1d, but
// stack slot s holds both the vertex index (v[s * nt]) and its value (f[s * nt]): a push at step q
// writes slot k <= q (the stack then holds k + 1 distinct positions <= q), i.e. a column element
// already consumed (elements are read in order, element q + 1 before that write), so the column
// doubles as the stack's value array. Writes out[x * os] for x = 0..n-1; reads no global memory.
template <bool kSqrt, typename V>
__device__ __forceinline__ void envelope_stacked(float* f, V* v, int nt, float* out, int64_t os,
                                                 int n, float w2) {
  const float inf = __int_as_float(0x7f800000);
  int k = -1;
  int it = 0, ip = 0;
  float ft = 0.f, fp = 0.f;
  float fnext = f[0];
  for (int q = 0; q < n; ++q) {
    const float fq = fnext;
    if (q + 1 < n) fnext = f[(q + 1) * nt];  // prefetch: independent of the stack work below
    if (!(fq < inf)) continue;
    while (k >= 1) {
      const float a = (fq - ft) + w2 * (float(q - it) * float(q + it));
      const float b = (ft - fp) + w2 * (float(it - ip) * float(it + ip));
      if (a * float(it - ip) <= b * float(q - it)) {
        --k;
        it = ip;
        ft = fp;
        if (k >= 1) {
          ip = int(v[(k - 1) * nt]);
          fp = f[(k - 1) * nt];
        }
      } else {
        break;
      }
    }
    ++k;  // k <= q here (see above)
    v[k * nt] = V(q);
    f[k * nt] = fq;
    ip = it;
    fp = ft;
    it = q;
    ft = fq;
  }
  if (k < 0) {
    for (int x = 0; x < n; ++x) out[x * os] = inf;
    return;
  }
  const int top = k;
  int j = 0;
  int ij = int(v[0]);
  float fj = f[0];
  int in = top >= 1 ? int(v[nt]) : 0;
  float fn = top >= 1 ? f[nt] : 0.f;
  for (int x = 0; x < n; ++x) {
    float dj = float(x - ij);
    float val = fj + w2 * dj * dj;
    while (j < top) {
      const float dn = float(x - in);
      const float vn = fn + w2 * dn * dn;
      if (!(vn <= val)) break;
      ++j;
      ij = in;
      fj = fn;
      val = vn;
      if (j < top) {
        in = int(v[(j + 1) * nt]);
        fn = f[(j + 1) * nt];
      }
    }
    out[x * os] = kSqrt ? sqrtf(val) : val;
  }
}

// Lines: `lines` of n positions; line l = (o, c) with o = l / inner, c = l % inner starts at
// data + o * n * inner + c, position q at + q * inner; updated in place. A thread's column sits in
// shared memory as [n][nt] floats, then its vertex indices as [n][nt] V (uint8_t when n <= 256,
// else uint16_t). Each thread copies its own column into its own smem slots with cp.async and waits for its own copies
// before reading them (no other thread touches those slots: no barrier). All reads of the line
// precede its writes, and lines are disjoint across threads, so the in-place update is safe.
template <bool kSqrt, typename V>
__global__ void lines_async_kernel(float* __restrict__ data, int64_t lines, int64_t inner, int n,
                                   float w2) {
  extern __shared__ float smem[];
  const int t = threadIdx.x, nt = blockDim.x;
  const int64_t line = int64_t(blockIdx.x) * nt + t;
  if (line >= lines) return;
  float* fcol = smem + t;                                               // [n][nt]
  V* vcol = reinterpret_cast<V*>(smem + int64_t(n) * nt) + t;           // [n][nt]
  const int64_t o = line / inner, c = line - o * inner;
  float* base = data + o * n * inner + c;
  for (int q = 0; q < n; ++q) __pipeline_memcpy_async(fcol + q * nt, base + q * inner, 4);
  __pipeline_commit();
  __pipeline_wait_prior(0);
  envelope_stacked<kSqrt>(fcol, vcol, nt, base, inner, n, w2);
}

template <bool kSqrt>
__global__ void lines_global_kernel(float* __restrict__ data, float* __restrict__ wf,
                                    int32_t* __restrict__ wv, int64_t lines, int64_t inner, int n,
                                    float w2) {
  const int64_t line = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (line >= lines) return;
  const int64_t o = line / inner, c = line - o * inner;
  float* base = data + o * n * inner + c;
  for (int q = 0; q < n; ++q) wf[q * lines + line] = base[q * inner];
  edt::envelope_1d<kSqrt>(wf + line, lines, base, inner, wv + line, lines, n, w2);
}

__global__ void signed_kernel(const uint8_t* __restrict__ mask, float* __restrict__ out,
                              const float* __restrict__ din, int64_t total) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = edt::signed_combine(mask[i], out[i], din[i]);
}

unsigned grid_for(int64_t work, int block) {
  return unsigned(std::min<int64_t>((work + block - 1) / block, int64_t(1) << 20));
}

// Block size and dynamic shared memory for `bytes` per position and thread: the largest power of
// two <= 256 threads within 48 KB (at least 32 threads; the opt-in above 48 KB is reserved here).
template <typename Kernel>
int smem_block(Kernel kernel, int n, int bytes, size_t* smem_out) {
  const int64_t per_thread = int64_t(n) * bytes;
  int threads = 256;
  while (threads > 32 && threads * per_thread > 48 * 1024) threads >>= 1;
  const size_t smem = size_t(threads * per_thread);
  if (smem > 48 * 1024) {
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) {
      cudaGetLastError();  // not to be reported again by the next launch check
      throw std::runtime_error(std::string("distance_transform: cannot reserve ") +
                               std::to_string(smem) + " bytes of shared memory: " +
                               cudaGetErrorString(err));
    }
  }
  *smem_out = smem;
  return threads;
}

template <bool kSqrt, typename V>
void lines_async_pass(float* data, int64_t lines, int64_t inner, int n, float w2,
                      cudaStream_t st) {
  size_t smem = 0;
  const int threads =
      smem_block(lines_async_kernel<kSqrt, V>, n, int(sizeof(float) + sizeof(V)), &smem);
  const int64_t blocks = (lines + threads - 1) / threads;
  if (blocks > int64_t(INT32_MAX)) throw std::invalid_argument("distance_transform: too many lines");
  lines_async_kernel<kSqrt, V><<<unsigned(blocks), threads, smem, st>>>(data, lines, inner, n, w2);
  check_launch("distance_transform lines_async_kernel");
}

template <bool kSqrt>
void lines_pass(float* data, int64_t lines, int64_t inner, int n, float w2, float* workspace,
                int smem_max_n, cudaStream_t st) {
  if (n <= smem_max_n) {
    if (n <= 256)
      lines_async_pass<kSqrt, uint8_t>(data, lines, inner, n, w2, st);
    else
      lines_async_pass<kSqrt, uint16_t>(data, lines, inner, n, w2, st);
  } else {
    if (workspace == nullptr)
      throw std::invalid_argument("distance_transform: an axis longer than " +
                                  std::to_string(smem_max_n) + " needs the CUDA workspace");
    const int threads = 128;
    const int64_t blocks = (lines + threads - 1) / threads;
    if (blocks > int64_t(INT32_MAX)) throw std::invalid_argument("distance_transform: too many lines");
    lines_global_kernel<kSqrt><<<unsigned(blocks), threads, 0, st>>>(
        data, workspace, reinterpret_cast<int32_t*>(workspace + lines * n), lines, inner, n, w2);
    check_launch("distance_transform lines_global_kernel");
  }
}

void transform(const uint8_t* mask, float* out, int64_t batch, int64_t D, int64_t H, int64_t W,
               const float sp[3], bool three_d, bool invert, float* workspace, int smem_max_n,
               cudaStream_t st) {
  const int64_t rows = batch * D * H;
  const unsigned rgrid = grid_for(rows * 32, 256);
  const int w = int(W);
  if (W > 512)
    rows_kernel<<<rgrid, 256, 0, st>>>(mask, out, rows, w, sp[2], invert);
  else if (W <= 32)
    rows_reg_kernel<1><<<rgrid, 256, 0, st>>>(mask, out, rows, w, sp[2], invert);
  else if (W <= 64)
    rows_reg_kernel<2><<<rgrid, 256, 0, st>>>(mask, out, rows, w, sp[2], invert);
  else if (W <= 128)
    rows_reg_kernel<4><<<rgrid, 256, 0, st>>>(mask, out, rows, w, sp[2], invert);
  else if (W <= 256)
    rows_reg_kernel<8><<<rgrid, 256, 0, st>>>(mask, out, rows, w, sp[2], invert);
  else
    rows_reg_kernel<16><<<rgrid, 256, 0, st>>>(mask, out, rows, w, sp[2], invert);
  check_launch("distance_transform rows_kernel");
  // H lines: (item, slice, w), stride W.
  const int64_t hlines = batch * D * W;
  if (three_d) {
    lines_pass<false>(out, hlines, W, int(H), sp[1] * sp[1], workspace, smem_max_n, st);
    // D lines: (item, h, w), stride H * W.
    lines_pass<true>(out, batch * H * W, H * W, int(D), sp[0] * sp[0], workspace, smem_max_n, st);
  } else {
    lines_pass<true>(out, hlines, W, int(H), sp[1] * sp[1], workspace, smem_max_n, st);
  }
}

}  // namespace

int edt_smem_max_n(int device) {
  int optin = 0;
  const cudaError_t err =
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("distance_transform: shared memory query failed: ") +
                             cudaGetErrorString(err));
  }
  // 32 threads x 6 bytes per position (uint16 vertex indices: lines over 256)
  return std::max(256, std::min(kEdtSmemMaxN, optin / (32 * 6)));
}

void distance_transform_forward_cuda(uintptr_t mask_addr, uintptr_t out_addr,
                                     uintptr_t scratch_addr, uintptr_t workspace_addr,
                                     int64_t batch, const std::vector<int64_t>& spatial,
                                     const std::vector<double>& spacing, bool signed_, int device,
                                     uintptr_t stream) {
  const edt::Geometry g = edt::make_geometry(batch, spatial, spacing, signed_, scratch_addr);
  if (g.empty()) return;
  const int64_t D = g.D, H = g.H, W = g.W;
  if (!edt_cuda_supported(spatial))
    throw std::invalid_argument("distance_transform: axis too long for the CUDA kernels "
                                "(distance_transform_cuda_supported is false)");
  const bool three_d = g.three_d;
  const float* sp = g.sp;

  const cuda::DeviceScope scope(device, "distance_transform");
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  const int smem_max_n = edt_smem_max_n(device);
  const auto* mask = reinterpret_cast<const uint8_t*>(mask_addr);
  auto* out = reinterpret_cast<float*>(out_addr);
  auto* ws = reinterpret_cast<float*>(workspace_addr);
  transform(mask, out, batch, D, H, W, sp, three_d, false, ws, smem_max_n, st);
  if (!signed_) return;
  auto* din = reinterpret_cast<float*>(scratch_addr);
  transform(mask, din, batch, D, H, W, sp, three_d, true, ws, smem_max_n, st);
  const int64_t total = batch * D * H * W;
  signed_kernel<<<grid_for(total, 256), 256, 0, st>>>(mask, out, din, total);
  check_launch("distance_transform signed_kernel");
}

}  // namespace colabx::cuda
