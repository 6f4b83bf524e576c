"""Every notebook's parameters and presets, declared once: one module per notebook (or pair of notebooks),
each readable on one screen (nnU-Net's plans as the example). :mod:`lib.config` resolves them."""

from lib.presets import ct_diffusion, cxr_change, data, evaluate, pretrain, xray_to_ct

NOTEBOOKS = {
    "01_explore_data": data.NB_01,
    "02_prepare_data": data.NB_02,
    "03_pretrain": pretrain.NB_03,
    "04_ct_diffusion": ct_diffusion.NB_04,
    "05_cxr_change": cxr_change.NB_05,
    "06_xray_to_ct": xray_to_ct.NB_06,
    "07_evaluate": evaluate.NB_07,
    "08_visualize": evaluate.NB_08,
}
