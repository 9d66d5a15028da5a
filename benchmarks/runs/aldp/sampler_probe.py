import sys

import numpy as np
from rdkit import Chem

from qmanifold.models.boltzmann import aldp


def load_sdf(p):
    return np.stack([m.GetConformer().GetPositions() for m in Chem.SDMolSupplier(p, removeHs=False)])
X = np.load(sys.argv[1])['positions']
rng = np.random.default_rng(0)
phi_r, psi_r = aldp.backbone_dihedrals(X); H = aldp.ramachandran_histogram(phi_r, psi_r)
def kl(x):
    p,q = aldp.backbone_dihedrals(x); return aldp.ramachandran_kl(H, aldp.ramachandran_histogram(p,q))
print('noise 1000', [round(kl(X[rng.choice(len(X), 1000, replace=False)]),3) for _ in range(5)])
for f in sys.argv[2:]:
    x = load_sdf(f); p,q = aldp.backbone_dihedrals(x)
    print(f, 'KL', round(kl(x),3))
    pd, qd = np.degrees(p), np.degrees(q); prd, qrd = np.degrees(phi_r), np.degrees(psi_r)
    print(' phi pct model', np.percentile(pd,[5,25,50,75,95]).round(0), 'md', np.percentile(prd,[5,25,50,75,95]).round(0))
    print(' psi pct model', np.percentile(qd,[5,25,50,75,95]).round(0), 'md', np.percentile(qrd,[5,25,50,75,95]).round(0))
    print(' alpha frac model', np.mean((qd>-120)&(qd<50)).round(3), 'md', np.mean((qrd>-120)&(qrd<50)).round(3))
    Q = aldp.ramachandran_histogram(p,q); P=H/H.sum(); Qn=(Q+1e-10)/(Q+1e-10).sum()
    contrib = P*np.log((P+1e-10)/Qn); 
    print(' KL from bins the model leaves empty', round(float(contrib[Q==0].sum()),3), 'md mass there', round(float(P[Q==0].sum()),4))
