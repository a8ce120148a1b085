// conv_transpose2d_phases: one stride phase's output (planes of PH x PW, from that phase's conv2d) into
// its interleaved positions of y (planes of OH x OW): y[plane][row0 + i * SH][col0 + j * SW] = part[plane][i][j].
// A work-item per element of the phase.

KERNEL void conv_transpose2d_phases(const GLOBAL float* RESTRICT part, GLOBAL float* RESTRICT y,
                                    int PH, int PW, int OH, int OW, int row0, int col0, int SH, int SW,
                                    int64 total)
{
    const int64 i = GLOBAL_ID_X;
    if (i >= total)
        return;
    const int64 plane = i / ((int64)PH * PW);
    const int r = (int)(i - plane * PH * PW);
    const int pi = r / PW, pj = r - pi * PW;
    y[plane * OH * OW + (int64)(row0 + pi * SH) * OW + col0 + pj * SW] = part[i];
}
