/* The grid formulas of magr.quantizers in float32, shared by the kernels in this folder.

Every float operation is the IEEE one written here (the kernels are built with -ffp-contract=off and without
-ffast-math), so the results equal torch's float32 elementwise operations to the bit.
*/
#ifndef MAGR_GRID_H
#define MAGR_GRID_H

#include <math.h>
#include <stdint.h>

/* Grid.row_params of one row's group v[0..g-1]: scale and zero in float32. */
static void fit_grid(const float *v, int64_t g, float beta, float maxq, int64_t sym, float *scale, float *zero) {
    float xmin = 0.0f, xmax = 0.0f; /* min(min v, 0), max(max v, 0) */
    for (int64_t k = 0; k < g; k++) {
        if (v[k] < xmin) xmin = v[k];
        if (v[k] > xmax) xmax = v[k];
    }
    if (sym) {
        xmax = fmaxf(-xmin, xmax);
        if (xmin < 0.0f) xmin = -xmax;
    }
    if (xmin == 0.0f && xmax == 0.0f) {
        xmin = -1.0f;
        xmax = 1.0f;
    }
    float s = (beta * (xmax - xmin)) / maxq;
    *scale = s;
    *zero = sym ? (maxq + 1.0f) / 2.0f : nearbyintf(-xmin / s);
}

/* magr.quantizers.quantize of one value: s * (clamp(round(u / s) + z, 0, maxq) - z), round half to even. */
static inline float nearest(float u, float s, float z, float maxq) {
    float q = nearbyintf(u / s) + z;
    q = q < 0.0f ? 0.0f : (q > maxq ? maxq : q);
    return s * (q - z);
}

#endif
