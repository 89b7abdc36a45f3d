// Click a header of a table.sortable to sort it (numbers by their data-sort key).
document.querySelectorAll('table.sortable th').forEach(function(th){
  th.addEventListener('click', function(){
    var table = th.closest('table'), body = table.tBodies[0], i = th.cellIndex;
    var dir = th.getAttribute('data-dir') === 'desc' ? 'asc' : 'desc';
    table.querySelectorAll('th').forEach(function(h){ h.removeAttribute('data-dir'); });
    th.setAttribute('data-dir', dir);
    function key(td){ var s = td.getAttribute('data-sort'); return s === null ? td.textContent.toLowerCase() : parseFloat(s); }
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function(a, b){
      var x = key(a.cells[i]), y = key(b.cells[i]);
      var c = typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === 'number' ? -1 : 1);
      return dir === 'asc' ? c : -c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
