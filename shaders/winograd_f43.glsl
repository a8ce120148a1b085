// Winograd F(4,3) transform matrices (convbackends/backends/_winograd.py holds the same, and G for the
// weights, which the host transforms once). B^T maps a 6x6 input tile, A^T a 6x6 product to 4x4 outputs.
#ifndef WINOGRAD_F43_GLSL
#define WINOGRAD_F43_GLSL

const float BT[6][6] = {
    {4.0, 0.0, -5.0, 0.0, 1.0, 0.0},
    {0.0, -4.0, -4.0, 1.0, 1.0, 0.0},
    {0.0, 4.0, -4.0, -1.0, 1.0, 0.0},
    {0.0, -2.0, -1.0, 2.0, 1.0, 0.0},
    {0.0, 2.0, -1.0, -2.0, 1.0, 0.0},
    {0.0, 4.0, 0.0, -5.0, 0.0, 1.0},
};
const float AT[4][6] = {
    {1.0, 1.0, 1.0, 1.0, 1.0, 0.0},
    {0.0, 1.0, -1.0, 2.0, -2.0, 0.0},
    {0.0, 1.0, 1.0, 4.0, 4.0, 0.0},
    {0.0, 1.0, -1.0, 8.0, -8.0, 1.0},
};

#endif
